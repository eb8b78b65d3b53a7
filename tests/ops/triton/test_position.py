"""TRITON add_timestamp_positional_embeddings vs PyTorch: output, d x, d position table,
d time table; the table rows chosen must be exactly PyTorch's."""

from __future__ import annotations

import pytest
import torch

from hstu.ops.pytorch import position as torch_ops
from hstu.ops.triton import position as triton_ops
from hstu.ops.triton.testing import assert_within_bound, compare_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _offsets(lengths):
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets.to(DEVICE)


def _case(lengths, targets, seed, num_positions=20, dim=24):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    # Epoch seconds: the int64 difference must be taken before any float conversion.
    timestamps = torch.randint(1_600_000_000, 1_700_000_000, (total,), generator=g)
    inputs = {
        "x": torch.randn(total, dim, generator=g, dtype=torch.float64),
        "position_table": torch.randn(num_positions, dim, generator=g, dtype=torch.float64),
        "time_table": torch.randn(2049, dim, generator=g, dtype=torch.float64),
    }
    inputs = {name: t.to(DEVICE).requires_grad_() for name, t in inputs.items()}
    num_targets = None if targets is None else torch.tensor(targets, device=DEVICE)
    return _offsets(lengths), timestamps.to(DEVICE), num_targets, inputs


def _op(module, offsets, timestamps, num_targets, **options):
    def run(x, position_table, time_table):
        return module.add_timestamp_positional_embeddings(
            x, offsets, timestamps, num_targets, position_table, time_table, alpha=22.6,
            num_time_buckets=2048, time_bucket_increments=60.0, **options)

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("time_bucket_fn", ["sqrt", "log"])
def test_matches_pytorch(dtype, time_bucket_fn):
    # Row 3 is longer than the 20-row position table (clamped); row 1 is one token; rows 2
    # and 4 are empty (the forward finds each token's row among offsets that repeat).
    offsets, timestamps, num_targets, inputs = _case([9, 1, 0, 30, 0], [2, 1, 0, 5, 0], seed=1)
    options = dict(contextual_seq_len=3, time_bucket_fn=time_bucket_fn)
    results = compare_op(_op(triton_ops, offsets, timestamps, num_targets, **options),
                         _op(torch_ops, offsets, timestamps, num_targets, **options),
                         inputs, dtype=dtype)
    assert_within_bound(results)


@pytest.mark.parametrize("use_time_encoding", [True, False], ids=["time", "no-time"])
def test_dropout_mask_and_its_gradient(use_time_encoding):
    # Each value is dropped (0) or scaled by 1/(1-p); the gradients are PyTorch's with that
    # same mask applied (the backward regenerates the mask from the forward's seed).
    p = 0.3
    offsets, timestamps, num_targets, inputs = _case([40, 7, 33], [3, 1, 5], seed=4)
    options = dict(contextual_seq_len=2, use_time_encoding=use_time_encoding)
    args = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    torch.manual_seed(0)
    out = _op(triton_ops, offsets, timestamps, num_targets, dropout_ratio=p, **options)(**args)
    reference = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    plain = _op(torch_ops, offsets, timestamps, num_targets, **options)(**reference)
    kept = out != 0
    assert abs(1.0 - kept.float().mean().item() - p) < 0.05
    torch.testing.assert_close(out[kept], plain.detach()[kept] / (1 - p), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    (plain * kept / (1 - p)).backward(grad)
    for name in ("x", "position_table") + (("time_table",) if use_time_encoding else ()):
        torch.testing.assert_close(args[name].grad, reference[name].grad, rtol=1e-4,
                                   atol=1e-4, msg=name)


def test_time_table_gradient_with_long_runs_of_one_bucket():
    # Most tokens fall in a few time buckets (a row's candidates all in the query's own), the
    # case where the table gradient's atomic adds pile onto a few rows: runs of one bucket
    # cross the kernel's blocks (64 tokens at this width), rows and both ends of the batch.
    lengths, targets = [150, 3, 90], [60, 1, 30]
    offsets, _, num_targets, inputs = _case(lengths, targets, seed=5)
    runs = torch.arange(sum(lengths)) // 37  # 37 tokens per timestamp
    timestamps = (1_650_000_000 + runs * 86_400).to(DEVICE)
    options = dict(contextual_seq_len=2, time_bucket_fn="log")
    args = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    reference = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    out = _op(triton_ops, offsets, timestamps, num_targets, **options)(**args)
    want = _op(torch_ops, offsets, timestamps, num_targets, **options)(**reference)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    used = reference["time_table"].grad.abs().sum(1) > 0
    assert 3 <= int(used.sum()) < 20  # few buckets, each taking many tokens
    for name in ("x", "position_table", "time_table"):
        torch.testing.assert_close(args[name].grad, reference[name].grad, rtol=1e-4,
                                   atol=1e-4, msg=name)


def test_backward_refuses_deterministic_mode():
    # The table gradients are float atomic adds: under torch.use_deterministic_algorithms the
    # backward says so (as torch's index_add_ on a GPU does) instead of running.
    offsets, timestamps, num_targets, inputs = _case([6, 3], [1, 1], seed=4)
    inputs = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    out = _op(triton_ops, offsets, timestamps, num_targets, contextual_seq_len=1)(**inputs)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="add_timestamp_positional_embeddings backward"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_without_time_encoding_or_targets():
    offsets, timestamps, _, inputs = _case([12, 5], None, seed=2)
    options = dict(contextual_seq_len=0, use_time_encoding=False)
    results = compare_op(_op(triton_ops, offsets, timestamps, None, **options),
                         _op(torch_ops, offsets, timestamps, None, **options),
                         inputs, dtype=torch.float32, names=("x", "position_table"))
    assert_within_bound(results)


def test_bucket_choice_is_exact():
    """A one-hot time table makes the output reveal each token's bucket."""
    lengths = [40, 25]
    offsets, timestamps, num_targets, inputs = _case(lengths, [3, 2], seed=3, dim=2049)
    eye = torch.eye(2049, device=DEVICE)
    zeros_x = torch.zeros(sum(lengths), 2049, device=DEVICE)
    zeros_p = torch.zeros(20, 2049, device=DEVICE)
    buckets = []
    for module in (triton_ops, torch_ops):
        out = module.add_timestamp_positional_embeddings(
            zeros_x, offsets, timestamps, num_targets, zeros_p, eye, alpha=1.0,
            contextual_seq_len=2, num_time_buckets=2048)
        buckets.append(out.argmax(1))
    assert torch.equal(buckets[0], buckets[1])


def test_bad_timestamps_are_named():
    offsets, timestamps, num_targets, inputs = _case([4], [1], seed=4)
    with pytest.raises(TypeError, match="timestamps must be int64 seconds"):
        triton_ops.add_timestamp_positional_embeddings(
            inputs["x"].detach().float(), offsets, timestamps.float(), num_targets,
            inputs["position_table"].detach().float(), inputs["time_table"].detach().float(),
            alpha=1.0, contextual_seq_len=0, num_time_buckets=2048)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_size_on_gpu(dtype):
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 3000, (16,), generator=g).tolist()
    targets = [min(n, 20) for n in lengths]
    offsets, timestamps, num_targets, inputs = _case(lengths, targets, seed=6,
                                                     num_positions=8192, dim=512)
    options = dict(contextual_seq_len=6, time_bucket_fn="sqrt")
    results = compare_op(_op(triton_ops, offsets, timestamps, num_targets, **options),
                         _op(torch_ops, offsets, timestamps, num_targets, **options),
                         inputs, dtype=dtype)
    assert_within_bound(results)


def _tokens_at(seed, *, use_time, dim=24, num_positions=20):
    """Tokens given by their place in their rows (add_position_time_at's inputs): some
    contextual (column < 3), some past the position table, some queried long ago."""
    g = torch.Generator().manual_seed(seed)
    total = 37
    first_target = torch.randint(0, 40, (total,), generator=g)
    columns = torch.randint(0, 45, (total,), generator=g)
    seconds = torch.randint(0, 10**8, (total,), generator=g)
    seconds[:4] = torch.tensor([0, 1, 59, 60])  # the clamp at 1e-6 and bucket edges
    return dict(
        seq_embeddings=torch.randn(total, dim, generator=g).to(DEVICE),
        columns=columns.to(DEVICE), first_target=first_target.to(DEVICE),
        seconds_before_query=seconds.to(DEVICE) if use_time else None,
        position_table=torch.randn(num_positions, dim, generator=g).to(DEVICE),
        time_table=torch.randn(2049, dim, generator=g).to(DEVICE) if use_time else None,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("time_bucket_fn", ["sqrt", "log", None])
def test_add_position_time_at_matches_pytorch(dtype, time_bucket_fn):
    from hstu.ops.position import add_position_time_at

    inputs = _tokens_at(3, use_time=time_bucket_fn is not None)
    inputs["seq_embeddings"] = inputs["seq_embeddings"].to(dtype)
    options = dict(alpha=22.6, contextual_seq_len=3, time_bucket_fn=time_bucket_fn or "sqrt",
                   time_bucket_increments=60.0, num_time_buckets=2048)
    with torch.no_grad():
        want = add_position_time_at(**inputs, **options, kernel="PYTORCH")
        got = add_position_time_at(**inputs, **options, kernel="TRITON")
    assert got.dtype == dtype and got.shape == want.shape
    # Same rows chosen and float32 arithmetic: equal up to the final rounding to dtype.
    tolerance = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance * 30, rtol=tolerance)
