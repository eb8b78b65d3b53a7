"""The dense scorer (encoder, item tower, fusion tower) replayed from CUDA graphs, one graph per
shape bucket, for training steps that the host cannot launch fast enough.

Why: at short histories the training step is bound by the host. On one H100 the 32-row step with
histories capped at 1,024 keeps the GPU busy about a third of the time: ~450 kernel launches,
each with its Python wrapper, take longer than the GPU takes to run them (docs/BENCHMARKS.md).
A CUDA graph replays a captured forward or backward with one launch.

A graph replays fixed shapes, and every batch has its own. So each batch is padded, after the
embedding lookups, to a bucket of (rows, history tokens, candidates, longest row):
- extra rows go after the batch's rows, and the padding tokens and candidates are spread over
  them, at most about 256 tokens each, so that the padding costs little attention work;
- padded embeddings are zeros, padded timestamps, actions and watch times 0;
- the scores come back for the batch's candidates only: the real rows come first, so their
  candidates are the first ones out.
Sizes grow in eight steps per power of two (at most 1/8 of padding). The buckets' graphs share
one memory pool: a step runs one bucket's forward and backward to the end before the next
step starts, so no two graphs are ever live at once.

Not every model can be graphed: BatchNorm in a tower would take its statistics over the padding,
so such models run eagerly (the reason is logged). Only training steps are graphed (eval runs the
same modules eagerly), and only on CUDA; with `capture=False` the padding runs eagerly (how the
CPU tests check that padding leaves the scores and gradients unchanged).

Verification: the padding is tested on the CPU (PYTORCH and the Triton interpreter); the capture,
replays and capture under DDP on one H100 (tests/modules/test_graphed_scoring_gpu.py), and the
training step in train_bench (docs/BENCHMARKS.md, "Session 10": 15.3 -> 10.1 ms at 32 rows of
1,024-token histories). The recapture after a parameter was replaced failed on an H100 in
session 12 (a stale memory pool, fixed since; the fix has not run on a GPU yet).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from hstu.ops import Kernel

logger = logging.getLogger(__name__)

# The most padding tokens one extra row holds: its attention work grows with its length squared.
PAD_ROW_TOKENS = 256
# The tensor inputs of the encoder, in the order a graph takes them (absent ones are skipped).
TENSOR_INPUTS = (
    "contextual", "uih", "uih_lengths", "candidates", "num_targets", "uih_timestamps",
    "candidate_timestamps", "uih_actions", "uih_watch_times",
)
# Inputs with one entry per history token / per candidate / per row.
PER_HISTORY_TOKEN = ("uih", "uih_timestamps", "uih_actions", "uih_watch_times")
PER_CANDIDATE = ("candidates", "candidate_timestamps")
PER_ROW = ("contextual",)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """The padded shape: rows, history tokens, candidates, and the longest row (history +
    candidates) that the kernels are told to expect."""

    rows: int
    history: int
    candidates: int
    max_item_len: int


def bucket_step(count: int, minimum: int) -> int:
    """The bucket step for `count`: 1/8 of the power of two below it, at least `minimum`."""
    if count <= minimum:
        return minimum
    return max(minimum, 1 << (count.bit_length() - 4))


def round_up(count: int, step: int) -> int:
    """`count` rounded up to a multiple of `step`, at least one step."""
    return max(step, -(-count // step) * step)


def bucket_for(rows: int, history: int, candidates: int, max_item_len: int) -> Bucket:
    """The bucket of a batch with `rows` rows, `history` history tokens, `candidates`
    candidates and a longest row of `max_item_len` (history + candidates)."""
    history_step = bucket_step(history, 1024)
    candidate_step = bucket_step(candidates, 128)
    # Enough extra rows that any batch of this bucket spreads its padding thin.
    pad_rows = math.ceil(history_step / PAD_ROW_TOKENS)
    padded_rows = round_up(rows + pad_rows, 8)
    longest_pad_row = (math.ceil(history_step / pad_rows) + math.ceil(candidate_step / pad_rows))
    longest = max(max_item_len, longest_pad_row, 1)
    return Bucket(
        rows=padded_rows,
        history=round_up(history, history_step),
        candidates=round_up(candidates, candidate_step),
        max_item_len=1 << (longest - 1).bit_length(),
    )


def _spread(total: int, parts: int, like: torch.Tensor) -> torch.Tensor:
    """`total` split into `parts` near-equal int64 counts, on like's device."""
    counts = torch.full((parts,), total // parts, dtype=torch.int64, device=like.device)
    counts[: total % parts] += 1
    return counts


def pad_inputs(inputs: dict, bucket: Bucket) -> dict:
    """The encoder inputs padded to `bucket` (see the module docstring); differentiable in the
    embeddings. The batch must fit the bucket."""
    rows = inputs["uih_lengths"].numel()
    history = inputs["uih"].shape[0]
    candidates = inputs["candidates"].shape[0]
    extra_rows = bucket.rows - rows
    if extra_rows < 1 or history > bucket.history or candidates > bucket.candidates:
        raise ValueError(f"pad_inputs: a batch of {rows} rows, {history} history tokens and "
                         f"{candidates} candidates does not fit {bucket}")
    extra = {"history": bucket.history - history, "candidates": bucket.candidates - candidates}
    padded = dict(inputs)
    padded["uih_lengths"] = torch.cat([
        inputs["uih_lengths"].to(torch.int64),
        _spread(extra["history"], extra_rows, inputs["uih_lengths"])])
    padded["num_targets"] = torch.cat([
        inputs["num_targets"].to(torch.int64),
        _spread(extra["candidates"], extra_rows, inputs["num_targets"])])
    for names, count in ((PER_HISTORY_TOKEN, extra["history"]),
                         (PER_CANDIDATE, extra["candidates"]), (PER_ROW, extra_rows)):
        for name in names:
            value = inputs.get(name)
            if value is not None:
                padding = value.new_zeros((count,) + tuple(value.shape[1:]))
                padded[name] = torch.cat([value, padding])
    padded["max_item_len"] = bucket.max_item_len
    return padded


class _DenseScorer(nn.Module):
    """encoder + item tower + fusion tower as one module taking tensors only (what
    make_graphed_callables needs), for one bucket. Not registered in the model: the towers'
    weights keep their names in the model's state_dict.

    autocast: (enabled, dtype) entered inside forward. The graphs are captured with autocast
    off around them, so that the backward graph runs without autocast as an eager backward does
    (torch's make_graphed_callables would otherwise capture the backward under the caller's
    autocast: pytorch/pytorch#120930)."""

    def __init__(self, encoder, item_tower, fusion_tower, names, max_item_len, autocast):
        super().__init__()
        self.encoder, self.item_tower, self.fusion_tower = encoder, item_tower, fusion_tower
        self.names = names
        self.max_item_len = max_item_len
        self.autocast = autocast

    def forward(self, *tensors):
        inputs = dict(zip(self.names, tensors))
        inputs["max_item_len"] = self.max_item_len
        enabled, dtype = self.autocast
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            return _score(self.encoder, self.item_tower, self.fusion_tower, inputs)


def _score(encoder, item_tower, fusion_tower, inputs: dict) -> tuple[torch.Tensor, ...]:
    user = encoder(**inputs)
    return tuple(fusion_tower(user, item_tower(inputs["candidates"])))


def parameters_as_inputs(module: nn.Module, count: int):
    """(run, params): run(*tensors, *weights) is module(*tensors) computed with `weights` in
    place of `params`, the module's trainable parameters (in named_parameters order), so that
    a graph can be captured with the weights as inputs. `count`: how many tensors come
    first."""
    trained = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
    names = tuple(name for name, _ in trained)

    def run(*args):
        weights = dict(zip(names, args[count:]))
        return torch.func.functional_call(module, weights, tuple(args[:count]))

    return run, tuple(param for _, param in trained)


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class GraphedScoring:
    """Scores a training batch from the CUDA graph of its shape bucket (captured on the
    bucket's first batch). Runs the batch unpadded and eagerly instead when the model cannot be
    graphed (BatchNorm in a tower; a kernel other than TRITON, whose ops read sizes back from
    the GPU), when `max_graphs` buckets already have graphs, off CUDA, without the longest row
    known on the host. A capture that fails raises (see `_capture`). capture=False pads every
    batch as for a graph but runs it eagerly: how the CPU tests check the padding. Called by
    score_candidates in training steps."""

    def __init__(self, *, capture: bool = True, max_graphs: int = 8, warmup_iters: int = 3):
        self.capture = capture
        self.max_graphs = max_graphs
        self.warmup_iters = warmup_iters
        self._graphs: dict[tuple, Callable[..., tuple[torch.Tensor, ...]]] = {}
        self._pool = None
        self._captured_ids: frozenset[int] = frozenset()  # id() of the captured parameters
        self._refused: str | None = None
        self.stats = {"graphed_steps": 0, "eager_steps": 0, "captures": 0}

    def refusal(self, modules) -> str | None:
        """Why these modules cannot be graphed, or None."""
        for module in modules:
            for name, sub in module.named_modules():
                where = name or type(module).__name__
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    return (f"{type(sub).__name__} at {where} would take its batch statistics "
                            "over the padding")
                kernel = getattr(sub, "kernel", None)
                if self.capture and kernel is not None and Kernel.parse(kernel) != Kernel.TRITON:
                    return (f"{where} runs the {Kernel.parse(kernel).name} kernel, whose ops "
                            "read sizes back from the GPU (not allowed in a graph); use TRITON")
        return None

    def __call__(self, encoder, item_tower, fusion_tower, inputs: dict) -> list[torch.Tensor]:
        modules = (encoder, item_tower, fusion_tower)
        if self._refused is None:
            self._refused = self.refusal(modules) or ""
            if self._refused:
                logger.warning("CUDA graphs off: %s", self._refused)
        max_item_len = inputs.get("max_item_len")
        if self._refused or max_item_len is None or (self.capture and not inputs["uih"].is_cuda):
            return self._unpadded(modules, inputs)
        candidates = inputs["candidates"].shape[0]
        bucket = bucket_for(inputs["uih_lengths"].numel(), inputs["uih"].shape[0], candidates,
                            int(max_item_len))
        names = tuple(name for name in TENSOR_INPUTS if inputs.get(name) is not None)
        autocast = _autocast_state()
        if not self.capture:
            padded = pad_inputs(inputs, bucket)
            self.stats["eager_steps"] += 1
            scorer = _DenseScorer(*modules, names, bucket.max_item_len, autocast)
            per_task = scorer(*(padded[name] for name in names))
            return [logits[:candidates] for logits in per_task]
        key = (names, bucket, autocast) + tuple(
            (inputs[name].dtype, inputs[name].requires_grad) for name in names)
        if self._graphs and not self._same_parameters(modules):
            # A parameter was replaced (or frozen, or unfrozen) since the capture: the graphs
            # would go on reading and training the old tensors. Capture anew.
            logger.warning("CUDA graphs: the dense parameters changed since the capture; "
                           "capturing again")
            self._graphs.clear()
            # A new memory pool too: once the graphs that shared the old one are gone, torch's
            # allocator no longer counts it, and capturing into it again fails an internal
            # assert ("it->second->use_count > 0", seen on an H100 with torch 2.11).
            self._pool = None
        if key not in self._graphs and len(self._graphs) >= self.max_graphs:
            return self._unpadded(modules, inputs)
        padded = pad_inputs(inputs, bucket)
        tensors = tuple(padded[name] for name in names)
        scorer = self._graphs.get(key) or self._capture(key, modules, names, bucket, autocast,
                                                        tensors)
        self.stats["graphed_steps"] += 1
        per_task = scorer(*tensors)
        # The graph's outputs are overwritten by its next replay: keep copies.
        return [logits[:candidates].clone() for logits in per_task]

    def _same_parameters(self, modules) -> bool:
        """Are the modules' trainable parameters the very tensors the graphs were captured
        with? (A few microseconds per step: one pass over ~100 parameters.)"""
        current = {id(p) for module in modules for p in module.parameters() if p.requires_grad}
        return current == self._captured_ids

    def _unpadded(self, modules, inputs: dict) -> list[torch.Tensor]:
        self.stats["eager_steps"] += 1
        return list(_score(*modules, inputs))

    def _capture(self, key, modules, names, bucket, autocast, tensors):
        """The bucket's graphed scorer (a callable taking the batch's tensors)."""
        holder = _DenseScorer(*modules, names, bucket.max_item_len, autocast)
        run, params = parameters_as_inputs(holder, len(names))
        # The graphs are captured against aliases of the parameters: new leaf tensors on the
        # same storage (so replays read the weights the optimizer updates in place), with
        # autograd nodes of their own. Capturing against the parameters themselves breaks
        # under DistributedDataParallel, which keeps each parameter's gradient accumulator;
        # that node belongs to the default stream, and the capture's backward would touch it
        # (torch warns "The AccumulateGrad node's stream does not match"; the capture is then
        # invalidated). The replay's gradients reach the real parameters outside the graph,
        # as an eager backward's do, so DDP's hooks fire as usual.
        aliases = tuple(param.detach().requires_grad_() for param in params)
        # Leaf copies as the graph's static inputs: the batch's own tensors would keep this
        # step's autograd graph (the lookups') alive as long as the graph lives.
        static = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        logger.info("capturing CUDA graphs for %s", bucket)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # Autocast off around the capture; _DenseScorer enters it for the forward only.
            with torch.autocast("cuda", enabled=False):
                graphed = torch.cuda.make_graphed_callables(
                    run, static + aliases, num_warmup_iters=self.warmup_iters,
                    allow_unused_input=True, pool=self._pool)
        except Exception as error:
            # No eager fallback: a capture that failed part-way leaves torch's CUDA generator
            # marked as capturing, so the next dropout draw would fail with a message that
            # hides this one (seen on an H100, 2026-12-07).
            raise RuntimeError(
                f"capturing CUDA graphs for {bucket} failed ({type(error).__name__}: {error}); "
                "train without --cuda-graphs, and report the model config") from error

        def scorer(*batch_tensors):
            return graphed(*batch_tensors, *params)

        # A replay's gradients come out of the graph's own buffers: autograd may keep such a
        # buffer as a parameter's .grad, and the next replay would then overwrite it. The
        # training step clears gradients with zero_grad(set_to_none=True) before each step
        # (hstu/train/step.py), and DDP (gradient_as_bucket_view) points .grad at its own
        # buckets; accumulating gradients over several steps would need a copy here.
        # `params` stays alive in `scorer`, so these ids cannot be reused by other tensors.
        self._captured_ids = frozenset(id(p) for p in params)

        self._graphs[key] = scorer
        self.stats["captures"] += 1
        return scorer
