"""CUTLASS HSTU attention: a thin adapter to the fused CUDA kernel of the `hstu_attn` package.

NOT RUN by this project's tests or CI: there is no GPU and no hstu_attn wheel on the machines
this code was written on. What is tested (tests/ops/cutlass/) is everything around the call:
the package lookup and its error, the input checks, the Triton fallback rule and the arguments
handed to the kernel (against a stand-in function). The kernel's numbers against the PyTorch
reference must be checked on a GPU with the package installed (see docs/serving.md).

The package. TorchEasyRec's doc installs it as (DEVICE cu126 or cu129):

    pip install hstu_attn-0.1.0+bea6b4b.${DEVICE} \
        -f https://tzrec.oss-accelerate.aliyuncs.com/third_party/hstu/${DEVICE}/repo.html

and calls `hstu_attn.hstu_attn_varlen_func`. Newer TorchEasyRec uses FBGEMM's
`fbgemm_gpu_hstu` wheel, whose top-level package is named `hstu`: that name is this project's
own package, so it cannot be imported here; this adapter uses `hstu_attn` only.

Requirements (checked here at call time; attention_dim == hidden_dim and BF16/FP16 training are
also checked when the config loads, hstu/config/validate.py):
  - a CUDA tensor on an Ampere, Ada or Hopper GPU;
  - q, k, v in bfloat16 or float16 (train with train_config.mixed_precision BF16 or FP16);
  - attention_dim == hidden_dim (q and v have the same head size), one of 32, 64, 128, 256;
  - fewer than 2^31 tokens in the batch (int32 offsets).
Fallback (as TorchEasyRec): a local window (max_attn_len > 0) combined with contextual tokens
or candidates is not supported by the kernel; such calls run the TRITON kernel instead, with a
one-time warning that says so.

Kernel call, per reference section 3.4: hstu_attn_varlen_func(q, k, v, cu_seqlens_q=,
cu_seqlens_k=, max_seqlen_q=, max_seqlen_k=, num_contexts=[c]*B or None, num_targets (int32) or
None, target_group_size=1, window_size=(max_attn_len or -1, 0), alpha, scaling_seqlen=S), which
computes SiLU(alpha q k^T) / S under the HSTU mask, as the other kernels do.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import torch

PACKAGE = "hstu_attn"
FUNCTION = "hstu_attn_varlen_func"
INSTALL_COMMAND = (
    "pip install hstu_attn-0.1.0+bea6b4b.${DEVICE} "
    "-f https://tzrec.oss-accelerate.aliyuncs.com/third_party/hstu/${DEVICE}/repo.html "
    "(DEVICE=cu126 or cu129)"
)
HEAD_DIMS = (32, 64, 128, 256)
HALF_DTYPES = (torch.bfloat16, torch.float16)
MAX_TOKENS = (1 << 31) - 1

_fallback_warned = False


class CutlassUnavailableError(ImportError):
    """The CUTLASS kernel cannot run here: package missing or too old."""


def kernel_function():
    """hstu_attn.hstu_attn_varlen_func, or CutlassUnavailableError saying how to install it."""
    try:
        module = importlib.import_module(PACKAGE)
    except ImportError as error:
        raise CutlassUnavailableError(
            f"kernel CUTLASS needs the fused HSTU attention package {PACKAGE!r}, which is not "
            f"installed ({error}). Install it on a CUDA machine (Ampere/Ada/Hopper) with:\n  "
            f"{INSTALL_COMMAND}\nor set model_config.kernel to TRITON or PYTORCH."
        ) from None
    function = getattr(module, FUNCTION, None)
    if function is None:
        raise CutlassUnavailableError(
            f"{PACKAGE} is installed but has no {FUNCTION}; install the version TorchEasyRec "
            f"uses: {INSTALL_COMMAND}"
        )
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return function
    if "scaling_seqlen" not in parameters:
        raise CutlassUnavailableError(
            f"{PACKAGE}.{FUNCTION} has no scaling_seqlen argument (an older release): it would "
            "divide by the batch's longest row instead of the configured constant S. Install "
            f"the release TorchEasyRec uses: {INSTALL_COMMAND}"
        )
    return function


def needs_triton_fallback(max_attn_len: int, contextual_seq_len: int, has_targets: bool) -> bool:
    """The kernel cannot combine a local window with contextual or candidate masking."""
    return max_attn_len > 0 and (contextual_seq_len > 0 or has_targets)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The kernel's input requirements (module docstring), each with what to change."""
    if q.dtype not in HALF_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"kernel CUTLASS needs bfloat16 or float16 q/k/v; got {q.dtype}/{k.dtype}/{v.dtype}. "
            'Train (and export) with train_config.mixed_precision "BF16" or "FP16".'
        )
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"kernel CUTLASS needs attention_dim == hidden_dim; got q/k head size "
            f"{q.shape[-1]} and v head size {v.shape[-1]}"
        )
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(
            f"kernel CUTLASS supports head sizes {HEAD_DIMS}; got {q.shape[-1]} "
            "(stu.attention_dim / stu.hidden_dim)"
        )
    if q.shape[0] > MAX_TOKENS:
        raise ValueError(
            f"kernel CUTLASS takes fewer than 2^31 tokens per batch (int32 offsets); got "
            f"{q.shape[0]}. Use a smaller batch."
        )
    if q.device.type != "cuda":
        raise ValueError(
            f"kernel CUTLASS runs on CUDA GPUs only; q is on {q.device}. Use kernel PYTORCH or "
            "TRITON here (e.g. --set model_config.kernel=PYTORCH)."
        )


def kernel_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    *,
    max_seq_len: int,
    num_targets: torch.Tensor | None,
    contextual_seq_len: int,
    max_attn_len: int,
    alpha: float | None,
    scaling_seqlen: int | None,
) -> tuple[tuple, dict]:
    """(args, kwargs) of hstu_attn_varlen_func for one hstu_mha call (reference 3.4)."""
    batch = seq_offsets.numel() - 1
    cu_seqlens = seq_offsets.to(torch.int32)
    num_contexts = None
    if contextual_seq_len > 0:
        num_contexts = torch.full((batch,), contextual_seq_len, dtype=torch.int32, device=q.device)
    # Offsets and lengths by keyword: releases differ in what sits between them (some take
    # seqused_q / seqused_k before max_seqlen_q), and a positional call would bind the maximum
    # length to the wrong parameter without an error. A release with other names fails loudly.
    args = (q, k, v)
    kwargs = {
        "cu_seqlens_q": cu_seqlens,
        "cu_seqlens_k": cu_seqlens,
        "max_seqlen_q": max_seq_len,
        "max_seqlen_k": max_seq_len,
        "num_contexts": num_contexts,
        "num_targets": num_targets.to(torch.int32) if num_targets is not None else None,
        "target_group_size": 1,
        "window_size": (max_attn_len if max_attn_len > 0 else -1, 0),
        "alpha": alpha if alpha is not None else q.shape[-1] ** -0.5,
        "scaling_seqlen": scaling_seqlen if scaling_seqlen is not None else max_seq_len,
    }
    return args, kwargs


def hstu_mha(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    *,
    max_seq_len: int,
    num_targets: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    alpha: float | None = None,
    scaling_seqlen: int | None = None,
    sort_by_length: bool = False,
) -> torch.Tensor:
    """CUTLASS version of hstu.ops.attention.hstu_mha (same arguments, minus `kernel`).
    sort_by_length reaches only the TRITON fallback; the fused kernel schedules itself."""
    global _fallback_warned
    if needs_triton_fallback(max_attn_len, contextual_seq_len, num_targets is not None):
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn(
                "kernel CUTLASS: the fused attention cannot combine max_attn_len > 0 with "
                "contextual tokens or candidates; attention runs the TRITON kernel instead",
                stacklevel=2,
            )
        from hstu.ops.triton.attention import hstu_mha as triton_hstu_mha

        return triton_hstu_mha(
            q,
            k,
            v,
            seq_offsets,
            max_seq_len=max_seq_len,
            num_targets=num_targets,
            contextual_seq_len=contextual_seq_len,
            max_attn_len=max_attn_len,
            alpha=alpha,
            scaling_seqlen=scaling_seqlen,
            sort_by_length=sort_by_length,
        )
    function = kernel_function()
    check_inputs(q, k, v)
    args, kwargs = kernel_arguments(
        q,
        k,
        v,
        seq_offsets,
        max_seq_len=max_seq_len,
        num_targets=num_targets,
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
        alpha=alpha,
        scaling_seqlen=scaling_seqlen,
    )
    return function(*args, **kwargs)
