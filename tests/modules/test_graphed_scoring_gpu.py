"""CUDA graph capture of the dense scorer (hstu/modules/graphed_scoring.py) on a GPU: replays give
the eager step's scores and gradients, new batches of a bucket reuse its graph, and dropout masks
are drawn anew per replay. Needs no TorchRec: the 27K encoder as encoder_bench builds it, with
small towers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hstu.modules.fusion_tower import FusionMTLTower
from hstu.modules.graphed_scoring import GraphedScoring, bucket_for
from hstu.modules.item_tower import ItemTower
from hstu.ops import Kernel

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cuda_generator_left_usable(request):
    """After each test here: can torch's CUDA generator still draw? A capture that fails
    part-way leaves it marked as capturing (hstu/modules/graphed_scoring.py), and every later
    test in the process that draws CUDA random numbers then fails for that reason, not its
    own (session 11 saw position tests fail after this module, cause unknown). Stop the run
    there, naming the test that broke it."""
    yield
    try:
        torch.randint(0, 2, (1,), device="cuda")
        torch.cuda.synchronize()
    except RuntimeError as error:
        pytest.exit(f"{request.node.name} left torch's CUDA generator unusable ({error}); the "
                    "GPU tests after it in this process would fail for that reason", returncode=1)


def _encoder_bench():
    spec = importlib.util.spec_from_file_location("encoder_bench",
                                                  REPO / "benchmarks" / "encoder_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(bench, dropout: bool):
    torch.manual_seed(0)
    encoder = bench.build_encoder("cuda")
    if not dropout:
        for module in encoder.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "output_dropout_ratio"):
                module.output_dropout_ratio = 0.0
    bench.set_kernel(encoder, Kernel.TRITON)
    item_tower = ItemTower(256, 512, hidden_dim=512, kernel=Kernel.TRITON).cuda()
    fusion_tower = FusionMTLTower(512, [1, 1], None).cuda()
    return encoder, item_tower, fusion_tower


def _inputs(bench, shape: str, seed: int) -> dict:
    inputs = bench.random_inputs(shape, "cuda", torch.Generator().manual_seed(seed))
    for name in ("contextual", "uih", "candidates"):
        inputs[name].requires_grad_(True)
    return inputs


def _step(modules, inputs, graphed):
    encoder, item_tower, fusion_tower = modules
    for module in modules:
        module.zero_grad(set_to_none=True)
    for name in ("contextual", "uih", "candidates"):
        inputs[name].grad = None
    with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
        if graphed is None:
            user = encoder(**inputs)
            per_task = fusion_tower(user, item_tower(inputs["candidates"]))
        else:
            per_task = graphed(encoder, item_tower, fusion_tower, inputs)
    loss = sum((logits.float() * torch.linspace(-1, 1, logits.shape[0], device="cuda")[:, None])
               .sum() for logits in per_task)
    loss.backward()
    grads = {name: inputs[name].grad.clone() for name in ("uih", "candidates", "contextual")}
    for index, module in enumerate(modules):
        for name, param in module.named_parameters():
            if param.grad is not None:
                grads[f"{index}.{name}"] = param.grad.clone()
    return [logits.detach().float() for logits in per_task], grads


def _close(got, want, what):
    error = float((got.float() - want.float()).abs().max())
    scale = float(want.float().abs().max())
    assert error <= 2e-2 * scale + 1e-3, f"{what}: max error {error} against scale {scale}"


def _close_gradient(got, want, what):
    # A weight's gradient sums thousands of bf16 products whose signs cancel; the padded step
    # runs other GEMM shapes and kernel grids, so single entries move by a few bf16 steps of
    # the largest one (seen on an H100: 0.375 at a largest entry of 15.8, 6 steps of 0.0625).
    # The whole gradient's relative error stays small; padding that leaked into a gradient
    # would add ~1/8 of it (the padded share of the rows).
    error = float((got.float() - want.float()).norm())
    scale = float(want.float().norm())
    assert error <= 2e-2 * scale + 1e-3, f"{what}: error norm {error} against norm {scale}"


def _bucket(inputs):
    return bucket_for(inputs["uih_lengths"].numel(), inputs["uih"].shape[0],
                      inputs["candidates"].shape[0], inputs["max_item_len"])


@pytest.mark.gpu
def test_graph_replays_match_the_eager_step():
    bench = _encoder_bench()
    modules = _model(bench, dropout=False)
    graphed = GraphedScoring(capture=True)
    batches = [_inputs(bench, shape, seed) for seed, shape in
               enumerate(["8x500", "8x480", "8x900"])]
    buckets = [_bucket(inputs) for inputs in batches]
    assert buckets[0] == buckets[1] != buckets[2]  # the first two share a graph
    for inputs in batches:
        want_logits, want_grads = _step(modules, inputs, None)
        got_logits, got_grads = _step(modules, inputs, graphed)
        for got, want in zip(got_logits, want_logits):
            assert got.shape == want.shape
            _close(got, want, f"{_bucket(inputs)} logits")
        assert got_grads.keys() == want_grads.keys()
        for name, want in want_grads.items():
            _close_gradient(got_grads[name], want, f"{_bucket(inputs)} gradient of {name}")
    assert graphed.stats == {"graphed_steps": 3, "eager_steps": 0, "captures": 2}


class _Scorer(torch.nn.Module):
    """The three modules behind one forward, as DistributedModelParallel's DDP wraps the
    model's dense part."""

    def __init__(self, modules, graphed):
        super().__init__()
        self.encoder, self.item_tower, self.fusion_tower = modules
        self.graphed = graphed

    def forward(self, inputs):
        modules = (self.encoder, self.item_tower, self.fusion_tower)
        if self.graphed is None:
            user = self.encoder(**inputs)
            return self.fusion_tower(user, self.item_tower(inputs["candidates"]))
        return self.graphed(*modules, inputs)


@pytest.mark.gpu
def test_graphs_capture_under_distributed_data_parallel(tmp_path):
    # The training step's dense modules sit in DDP (static graph), which keeps each
    # parameter's gradient accumulator: capturing against the parameters themselves broke
    # there (train_bench --cuda-graphs on an H100, 2026-12-07) while the bare modules captured.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    bench = _encoder_bench()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        modules = _model(bench, dropout=False)
        graphed = GraphedScoring(capture=True)
        wrapped = DistributedDataParallel(_Scorer(modules, None), static_graph=True)
        for seed, shape in enumerate(["8x500", "8x480"]):
            inputs = _inputs(bench, shape, seed)
            results = []
            for scorer in (None, graphed):  # eager, then from the graphs
                wrapped.module.graphed = scorer
                wrapped.zero_grad(set_to_none=True)
                with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                    per_task = wrapped(inputs)
                loss = sum((logits.float() * torch.linspace(
                    -1, 1, logits.shape[0], device="cuda")[:, None]).sum()
                    for logits in per_task)
                loss.backward()
                results.append(({name: p.grad.clone() for name, p in
                                 wrapped.module.named_parameters() if p.grad is not None},
                                [logits.detach().float() for logits in per_task]))
            (want_grads, want_logits), (got_grads, got_logits) = results
            for got, want in zip(got_logits, want_logits):
                _close(got, want, f"{shape} logits")
            assert got_grads.keys() == want_grads.keys() and want_grads
            for name, want in want_grads.items():
                _close_gradient(got_grads[name], want, f"{shape} gradient of {name}")
        assert graphed.stats == {"graphed_steps": 2, "eager_steps": 0, "captures": 1}
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_each_replay_draws_new_dropout_masks():
    bench = _encoder_bench()
    modules = _model(bench, dropout=True)
    graphed = GraphedScoring(capture=True)
    inputs = _inputs(bench, "4x300", 0)
    first, _ = _step(modules, inputs, graphed)
    second, _ = _step(modules, inputs, graphed)
    assert graphed.stats["captures"] == 1 and graphed.stats["graphed_steps"] == 2
    assert not torch.equal(first[0], second[0])


@pytest.mark.gpu
def test_a_replaced_parameter_is_captured_again_and_trained():
    # The graphs read the parameters they were captured with; a parameter replaced afterwards
    # (load_state_dict(assign=True), a new nn.Parameter) must not be left untrained.
    bench = _encoder_bench()
    modules = _model(bench, dropout=False)
    graphed = GraphedScoring(capture=True)
    inputs = _inputs(bench, "4x300", 0)
    _step(modules, inputs, graphed)
    fusion_tower = modules[2]
    name, old = next(iter(fusion_tower.named_parameters()))
    module_name, _, attribute = name.rpartition(".")
    owner = fusion_tower.get_submodule(module_name) if module_name else fusion_tower
    setattr(owner, attribute, torch.nn.Parameter(old.detach().clone() * 2))
    _, got_grads = _step(modules, inputs, graphed)
    _, want_grads = _step(modules, inputs, None)
    assert graphed.stats["captures"] == 2
    assert f"2.{name}" in got_grads
    _close_gradient(got_grads[f"2.{name}"], want_grads[f"2.{name}"], f"gradient of {name}")
