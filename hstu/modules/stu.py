"""STU layer and stack (reference 2.7): the HSTU encoder's repeated block.

    u, q, k, v = split(LayerNorm(x) @ W_uvqk + b)      SiLU on u only
    o          = sum_j SiLU(alpha q_i k_j) / S * M_ij v_j   (no softmax; S a constant)
    x_out      = x + Dropout(concat[u, o, u * Norm(o)]) @ W_o
"""

from __future__ import annotations

import torch
from torch import nn

from hstu.ops import Kernel, LayerSettings, hstu_mha, stu_layer, stu_postprocess, stu_preprocess
from hstu.ops.cached_attention import CacheRows, hstu_mha_cached


class STULayer(nn.Module):
    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        hidden_dim: int,
        attention_dim: int,
        scaling_seqlen: int,
        output_dropout_ratio: float = 0.3,
        max_attn_len: int = 0,
        attn_alpha: float | None = None,
        use_group_norm: bool = False,
        recompute_normed_x: bool = True,
        recompute_uvqk: bool = True,
        recompute_y: bool = True,
        contextual_seq_len: int = 0,
        kernel: Kernel = Kernel.PYTORCH,
        sort_by_length: bool = False,
    ) -> None:
        super().__init__()
        if scaling_seqlen <= 0:
            raise ValueError(f"STU scaling_seqlen must be > 0; got {scaling_seqlen}")
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.attention_dim = attention_dim
        self.scaling_seqlen = scaling_seqlen
        self.output_dropout_ratio = output_dropout_ratio
        self.max_attn_len = max_attn_len
        self.attn_alpha = attn_alpha if attn_alpha else attention_dim**-0.5
        self.use_group_norm = use_group_norm
        self.recompute_normed_x = recompute_normed_x
        self.recompute_uvqk = recompute_uvqk
        self.recompute_y = recompute_y
        self.contextual_seq_len = contextual_seq_len
        self.kernel = kernel
        # Scheduling only (TRITON launches the longest rows first); never a number.
        self.sort_by_length = sort_by_length
        self.norm_eps = 1e-6

        uvqk_width = 2 * num_heads * (hidden_dim + attention_dim)
        self.input_norm_weight = nn.Parameter(torch.ones(embedding_dim))
        self.input_norm_bias = nn.Parameter(torch.zeros(embedding_dim))
        self.uvqk_weight = nn.Parameter(torch.empty(embedding_dim, uvqk_width))
        self.uvqk_bias = nn.Parameter(torch.zeros(uvqk_width))
        output_norm_dim = num_heads if use_group_norm else num_heads * hidden_dim
        self.output_norm_weight = nn.Parameter(torch.ones(output_norm_dim))
        self.output_norm_bias = nn.Parameter(torch.zeros(output_norm_dim))
        self.output_weight = nn.Parameter(torch.empty(3 * num_heads * hidden_dim, embedding_dim))
        nn.init.xavier_uniform_(self.uvqk_weight)
        nn.init.xavier_uniform_(self.output_weight)

    def forward(
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [sum L, D]; seq_offsets [B+1]; max_seq_len >= every row length. Returns [sum L, D].
        The same steps as cached_forward's, as one op (TRITON fuses them)."""
        settings = LayerSettings(
            norm_eps=self.norm_eps,
            num_heads=self.num_heads,
            attention_dim=self.attention_dim,
            hidden_dim=self.hidden_dim,
            max_seq_len=max_seq_len,
            sort_by_length=self.sort_by_length,
            dropout_ratio=self.output_dropout_ratio if self.training else 0.0,
            group_norm=self.use_group_norm,
            recompute_normed_x=self.recompute_normed_x,
            recompute_y=self.recompute_y,
            recompute_uvqk=self.recompute_uvqk,
            **self._mask_options(),
        )
        return stu_layer(
            x, seq_offsets, num_targets, self.input_norm_weight, self.input_norm_bias,
            self.uvqk_weight, self.uvqk_bias, self.output_norm_weight, self.output_norm_bias,
            self.output_weight, settings, kernel=self.kernel,
        )

    def cached_forward(
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: torch.Tensor,
        k_cache: torch.Tensor | CacheRows | None,
        v_cache: torch.Tensor | CacheRows | None,
        cache_offsets: torch.Tensor | None,
        max_cache_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference on the last rows of each row ("delta"), with the first rows' keys and
        values given (the cache) instead of recomputed.

        x [sum Q, D]: this layer's input for the delta rows; seq_offsets [B+1] over them;
        num_targets [B]: candidates at the end of each delta. k_cache [sum P, H, d_qk],
        v_cache [sum P, H, d_v], cache_offsets [B+1]: this layer's keys and values of the
        first P_b rows of row b, or CacheRows (one tensor per row, read in place); None, or
        max_cache_len 0: no row has a cache, the delta is the whole row. Returns (output
        [sum Q, D], k [sum Q, H, d_qk], v [sum Q, H, d_v]): the delta rows' output, and their
        keys and values (what a cache of them would hold).

        The output equals forward()'s for those rows whenever the cache holds what forward()
        would compute for the first rows: rows never attend to later rows, except contextual
        tokens (which see the whole history) and nothing attends to candidates but themselves
        (hstu/modules/kv_cache.py works out when that holds). Eval mode only: there is no
        dropout here, and the cached attention has no backward.
        """
        if self.training:
            raise RuntimeError("STULayer.cached_forward is for inference: call .eval() first")
        u, q, k, v = self._preprocess(x)
        if k_cache is None or max_cache_len == 0:
            # Nothing cached: the delta rows are whole rows, and the training kernel applies.
            attn = self._attention(q, k, v, seq_offsets, max_seq_len, num_targets)
        else:
            attn = hstu_mha_cached(
                q, k, v, seq_offsets, k_cache, v_cache, cache_offsets,
                max_seq_len=max_seq_len,
                max_cache_len=max_cache_len,
                num_targets=num_targets,
                **self._attention_options(),
            )
        return self._postprocess(attn, u, x), k, v

    # The steps forward() and cached_forward() share, so that the two paths cannot drift.
    # The recompute flags only trade memory for compute in the backward: never a number.

    def _preprocess(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return stu_preprocess(
            x,
            self.input_norm_weight,
            self.input_norm_bias,
            self.norm_eps,
            self.uvqk_weight,
            self.uvqk_bias,
            num_heads=self.num_heads,
            attention_dim=self.attention_dim,
            hidden_dim=self.hidden_dim,
            kernel=self.kernel,
            recompute_normed_x=self.recompute_normed_x,
            recompute_uvqk=self.recompute_uvqk,
        )

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: torch.Tensor | None,
    ) -> torch.Tensor:
        return hstu_mha(
            q,
            k,
            v,
            seq_offsets,
            max_seq_len=max_seq_len,
            num_targets=num_targets,
            sort_by_length=self.sort_by_length,
            **self._attention_options(),
        )

    def _mask_options(self) -> dict:
        # One place for the mask and scale settings: the cached rows match forward()'s only
        # while both attention paths get the same ones.
        return {
            "contextual_seq_len": self.contextual_seq_len,
            "max_attn_len": self.max_attn_len,
            "alpha": self.attn_alpha,
            "scaling_seqlen": self.scaling_seqlen,
        }

    def _attention_options(self) -> dict:
        return {**self._mask_options(), "kernel": self.kernel}

    def _postprocess(self, attn: torch.Tensor, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return stu_postprocess(
            attn.reshape(attn.shape[0], -1),
            u,
            x,
            self.output_norm_weight,
            self.output_norm_bias,
            self.norm_eps,
            self.output_weight,
            num_heads=self.num_heads,
            dropout_ratio=self.output_dropout_ratio,
            training=self.training,
            group_norm=self.use_group_norm,
            kernel=self.kernel,
            recompute_y=self.recompute_y,
        )


class STUStack(nn.Module):
    """attn_num_layers STU layers in sequence; no norm after the last (the postprocessor's job)."""

    def __init__(self, layers: list[STULayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: torch.Tensor | None,
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, seq_offsets, max_seq_len, num_targets)
        return x

    def cached_forward(
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        num_targets: torch.Tensor,
        caches: list[tuple[torch.Tensor | CacheRows, torch.Tensor | CacheRows]] | None,
        cache_offsets: torch.Tensor | None,
        max_cache_len: int,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """STULayer.cached_forward through every layer: caches holds one (k, v) per layer
        (None: nothing cached). Returns the delta rows' output and, per layer, their (k, v)."""
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"{len(caches)} cached layers for a stack of {len(self.layers)}")
        delta_kv = []
        for index, layer in enumerate(self.layers):
            k_cache, v_cache = caches[index] if caches is not None else (None, None)
            x, k, v = layer.cached_forward(
                x, seq_offsets, max_seq_len, num_targets, k_cache, v_cache, cache_offsets,
                max_cache_len,
            )
            delta_kv.append((k, v))
        return x, delta_kv
