"""Padding to CUDA-graph buckets (hstu/modules/graphed_scoring.py): the buckets, the padded
inputs, and the whole model's scores and gradients with and without padding (on the CPU the
padded path runs eagerly; the capture itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from hstu.config import load_config
from hstu.modules.graphed_scoring import (
    PAD_ROW_TOKENS,
    Bucket,
    GraphedScoring,
    bucket_for,
    pad_inputs,
    parameters_as_inputs,
)
from tests.test_model import NO_DROPOUT, SMOKE, build, make_batch


def test_buckets_hold_the_batch_with_at_most_an_eighth_of_padding():
    for rows, history, candidates, longest in [(32, 20_000, 3_200, 1_124), (74, 125_000, 5_000, 7_994),
                                                (1, 5, 1, 6), (3, 1024, 128, 400)]:
        bucket = bucket_for(rows, history, candidates, longest)
        assert bucket.history >= history and bucket.candidates >= candidates
        assert bucket.rows > rows and bucket.rows % 8 == 0
        assert bucket.max_item_len >= longest
        assert bucket.max_item_len & (bucket.max_item_len - 1) == 0  # a power of two
        if history > 1024:
            assert bucket.history - history <= history / 8
        # The extra rows hold the padding in pieces of about PAD_ROW_TOKENS tokens.
        extra_rows = bucket.rows - rows
        assert -(-(bucket.history - history) // extra_rows) <= PAD_ROW_TOKENS
    # Batches of nearby sizes share a bucket (that is what lets a graph be replayed).
    assert bucket_for(32, 20_100, 3_200, 1_124) == bucket_for(32, 20_400, 3_200, 1_100)
    assert bucket_for(32, 20_100, 3_200, 1_124) != bucket_for(32, 24_000, 3_200, 1_124)


def test_pad_inputs_appends_rows_that_hold_the_padding():
    inputs = dict(
        contextual=torch.randn(2, 6),
        uih=torch.randn(7, 4, requires_grad=True),
        uih_lengths=torch.tensor([3, 4]),
        candidates=torch.randn(3, 5, requires_grad=True),
        num_targets=torch.tensor([1, 2]),
        uih_timestamps=torch.arange(7),
        candidate_timestamps=torch.arange(3),
        uih_actions=torch.arange(7),
        uih_watch_times=None,
        max_item_len=6,
    )
    bucket = bucket_for(2, 7, 3, 6)
    padded = pad_inputs(inputs, bucket)
    rows = bucket.rows
    assert padded["uih_lengths"].shape == (rows,) and padded["num_targets"].shape == (rows,)
    assert padded["uih_lengths"][:2].tolist() == [3, 4]
    assert padded["num_targets"][:2].tolist() == [1, 2]
    assert int(padded["uih_lengths"].sum()) == bucket.history == padded["uih"].shape[0]
    assert int(padded["num_targets"].sum()) == bucket.candidates == padded["candidates"].shape[0]
    # The padding is spread evenly over the extra rows.
    extra = padded["uih_lengths"][2:]
    assert int(extra.max() - extra.min()) <= 1
    assert padded["contextual"].shape == (rows, 6)
    assert padded["uih_timestamps"].shape == (bucket.history,)
    assert padded["uih_watch_times"] is None
    assert padded["max_item_len"] == bucket.max_item_len
    # The real values come first and the padding is zeros.
    torch.testing.assert_close(padded["uih"][:7], inputs["uih"])
    assert not padded["uih"][7:].any() and not padded["contextual"][2:].any()
    # Gradients reach the unpadded embeddings.
    padded["uih"].sum().backward()
    assert torch.equal(inputs["uih"].grad, torch.ones(7, 4))
    with pytest.raises(ValueError, match="does not fit"):
        pad_inputs(inputs, Bucket(rows=2, history=1024, candidates=128, max_item_len=8))
    with pytest.raises(ValueError, match="does not fit"):
        pad_inputs(inputs, Bucket(rows=8, history=6, candidates=128, max_item_len=8))


def _scores_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(batch)
    total, _ = model.compute_losses(output, batch)
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in output.logits.items()}, total.detach(), grads


@pytest.mark.parametrize("ascending", [True, False])
def test_padded_scoring_gives_the_same_scores_losses_and_gradients(ascending):
    overrides = list(NO_DROPOUT)
    if not ascending:
        overrides.append("model_config.dlrm_hstu.sequence_timestamp_is_ascending=false")
    model = build(load_config(SMOKE, overrides), seed=11).train()
    batch = make_batch(model, [5, 9, 2, 7], [3, 4, 1, 2], seed=12)
    want_logits, want_loss, want_grads = _scores_and_gradients(model, batch)
    model.use_cuda_graphs(capture=False)
    got_logits, got_loss, got_grads = _scores_and_gradients(model, batch)
    assert model.graphed_scoring.stats["eager_steps"] == 1
    for task, logits in want_logits.items():
        assert got_logits[task].shape == logits.shape
        torch.testing.assert_close(got_logits[task], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        # Sums over more rows in another order: equal up to float32 reassociation, measured
        # against the gradient's own scale (elementwise, small entries of large sums differ).
        error = float((got_grads[name] - grad).abs().max())
        assert error <= 1e-6 * (1.0 + float(grad.abs().max())), (name, error)
    # Eval never pads: the same modules run as they are.
    model.eval()
    with torch.no_grad():
        model(batch)
    assert model.graphed_scoring.stats["eager_steps"] == 1


def test_parameters_as_inputs_computes_the_module_with_the_given_weights():
    # What the graphs are captured with: the module run on weights passed as inputs. Given the
    # parameters themselves it is the module; given aliases (new leaves on the same storage),
    # the gradients go to the aliases and the parameters' own .grad stays untouched.
    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    module[0].bias.requires_grad_(False)  # frozen parameters stay module attributes
    run, params = parameters_as_inputs(module, count=1)
    assert len(params) == 3 and all(p.requires_grad for p in params)
    x = torch.randn(5, 4, requires_grad=True)
    want = module(x)
    want.square().sum().backward()
    want_grads = [p.grad.clone() for p in params] + [x.grad.clone()]
    module.zero_grad(set_to_none=True)
    x.grad = None
    got = run(x, *params)
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    for grad, expected in zip([p.grad for p in params] + [x.grad], want_grads):
        torch.testing.assert_close(grad, expected)
    module.zero_grad(set_to_none=True)
    aliases = [p.detach().requires_grad_() for p in params]
    run(x, *aliases).square().sum().backward()
    assert all(p.grad is None for p in params)
    for alias, expected in zip(aliases, want_grads):
        torch.testing.assert_close(alias.grad, expected)
    # The aliases share the parameters' storage: an in-place update is seen through them.
    with torch.no_grad():
        params[0].add_(1.0)
    assert torch.equal(aliases[0], params[0])


def test_models_that_cannot_be_graphed_run_unpadded():
    batch_norm = load_config(SMOKE, list(NO_DROPOUT) + [
        "model_config.dlrm_hstu.fusion_mtl_tower.mlp.use_ln=false",
        "model_config.dlrm_hstu.fusion_mtl_tower.mlp.use_bn=true"])
    model = build(batch_norm, seed=1)
    reason = GraphedScoring(capture=False).refusal(
        (model.encoder, model.item_tower, model.fusion_tower))
    assert reason is not None and "BatchNorm1d" in reason
    # BatchNorm would take its statistics over the padding: such a model is never padded.
    model.train()
    batch = make_batch(model, [5, 9, 2], [3, 4, 1], seed=2)
    want, _, _ = _scores_and_gradients(model, batch)
    model.use_cuda_graphs(capture=False)
    got, _, _ = _scores_and_gradients(model, batch)
    for task, logits in want.items():
        torch.testing.assert_close(got[task], logits)
    # A kernel other than TRITON reads sizes back from the GPU, which a capture cannot hold.
    pytorch = build(load_config(SMOKE, NO_DROPOUT), seed=1)
    modules = (pytorch.encoder, pytorch.item_tower, pytorch.fusion_tower)
    assert "PYTORCH kernel" in GraphedScoring().refusal(modules)
    assert GraphedScoring(capture=False).refusal(modules) is None  # padding alone is fine
    triton = build(load_config(SMOKE, list(NO_DROPOUT) + ["model_config.kernel=TRITON"]), seed=1)
    assert GraphedScoring().refusal(
        (triton.encoder, triton.item_tower, triton.fusion_tower)) is None


def test_padding_keeps_the_triton_dropout_masks_of_the_real_tokens():
    # TRITON draws its dropout masks per token index, and the padding comes after every real
    # token: with the same seeds, the padded step drops the same values (the interpreter runs
    # the kernels on the CPU). The towers' own dropout is torch's, whose mask depends on the
    # tensor's size, hence off here.
    model = build(load_config(SMOKE, ["model_config.kernel=TRITON"]), seed=13).train()
    assert model.encoder.input_dropout.p > 0
    batch = make_batch(model, [6, 3, 8], [2, 3, 1], seed=14)
    torch.manual_seed(5)
    want_logits, want_loss, _ = _scores_and_gradients(model, batch)
    model.use_cuda_graphs(capture=False)
    torch.manual_seed(5)
    got_logits, got_loss, _ = _scores_and_gradients(model, batch)
    for task, logits in want_logits.items():
        torch.testing.assert_close(got_logits[task], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
