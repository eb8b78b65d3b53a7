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
            _close(got_grads[name], want, f"{_bucket(inputs)} gradient of {name}")
    assert graphed.stats == {"graphed_steps": 3, "eager_steps": 0, "captures": 2}


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
