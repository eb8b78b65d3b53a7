"""TRITON hstu_mha against the PyTorch reference, forward and every gradient.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny rows with small
pinned tiles, so that rows span several tiles and every loop (contextual keys, unmasked tiles,
masked edge tiles, candidates' own terms) runs. The `gpu` tests repeat the comparison at full
size with the tuned configs.
"""

from __future__ import annotations

import pytest
import torch

from hstu.ops.pytorch.attention import hstu_mha as torch_mha
from hstu.ops.triton import attention as attention_module
from hstu.ops.triton._common import Tile, pinned
from hstu.ops.triton.attention import dq_mode
from hstu.ops.triton.attention import hstu_mha as triton_mha
from hstu.ops.triton.testing import assert_within_bound, compare_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = Tile(16, 16)


def _offsets(lengths: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets.to(DEVICE)


def _inputs(lengths, heads, d_qk, d_v, seed):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE)

    return {
        "q": rand(total, heads, d_qk).requires_grad_(),
        "k": rand(total, heads, d_qk).requires_grad_(),
        "v": rand(total, heads, d_v).requires_grad_(),
    }


def _check(lengths, targets, *, dtype=torch.float32, contextual=0, window=0, heads=1, d_qk=16,
           d_v=16, tile=SMALL, mode="atomic", seed=0, max_seq_len=None, scaling_seqlen=None):
    offsets = _offsets(lengths)
    num_targets = None if targets is None else torch.tensor(targets, device=DEVICE)
    options = dict(
        max_seq_len=max_seq_len or max(max(lengths), 1),
        num_targets=num_targets,
        contextual_seq_len=contextual,
        max_attn_len=window,
        scaling_seqlen=scaling_seqlen,
    )

    def reference(q, k, v):
        return torch_mha(q, k, v, offsets, **options)

    def kernel(q, k, v):
        return triton_mha(q, k, v, offsets, **options)

    tiles = {} if tile is None else dict(
        attn_fwd=tile, attn_bwd_dkdv=tile, attn_bwd_dkdv_atomic=tile, attn_bwd_dq=tile
    )
    with pinned(**tiles), dq_mode(mode):
        results = compare_op(kernel, reference, _inputs(lengths, heads, d_qk, d_v, seed),
                             dtype=dtype, grad_seed=seed)
    assert_within_bound(results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_jagged_rows_with_targets_and_contextual(dtype):
    # 37 and 22 are not multiples of the 16-wide tiles; row 2 has no candidates.
    _check([37, 22, 9], [5, 3, 0], dtype=dtype, contextual=3, heads=2, mode="separate", seed=1)


@pytest.mark.parametrize(
    "lengths, targets, contextual, window",
    [
        pytest.param([1, 1], [1, 0], 0, 0, id="length-1"),
        pytest.param([20, 7], [20, 7], 0, 0, id="only-candidates"),
        pytest.param([35, 18], None, 0, 0, id="no-candidates-plain-causal"),
        pytest.param([35, 0, 18], [4, 0, 2], 2, 0, id="empty-row-and-contextual"),
        pytest.param([40, 19], [6, 2], 20, 0, id="contextual-longer-than-a-tile"),
        pytest.param([45, 30], [5, 3], 0, 7, id="max-attn-len"),
        pytest.param([45, 30], [5, 3], 4, 7, id="max-attn-len-with-contextual"),
        pytest.param([2, 5, 3], [1, 5, 2], 3, 0, id="rows-shorter-than-contextual"),
    ],
)
def test_edge_cases(lengths, targets, contextual, window):
    _check(lengths, targets, contextual=contextual, window=window)


@pytest.mark.parametrize("tile", [Tile(16, 32), Tile(32, 16)], ids=str)
@pytest.mark.parametrize("mode", ["atomic", "separate"])
def test_unequal_tiles_and_dq_modes(tile, mode):
    _check([50, 13], [4, 13], contextual=2, window=0, tile=tile, mode=mode, seed=3,
           d_qk=24, d_v=8, heads=1)


def test_launch_and_row_orders_compute_the_same_numbers(monkeypatch):
    """The launch order and sort_by_length only change which program runs when: with the
    deterministic dQ kernel
    both orders give bit-identical outputs and gradients, and both are within the bound."""
    lengths, targets = [40, 7, 23], [3, 0, 5]
    offsets = _offsets(lengths)
    num_targets = torch.tensor(targets, device=DEVICE)
    grad = torch.randn(sum(lengths), 2, 16, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    results = []
    orders = [(launch, sort) for sort in (False, True) for launch in attention_module.LAUNCH_ORDERS]
    for order, sort_by_length in orders:
        monkeypatch.setattr(attention_module, "LAUNCH_ORDER", order)
        _check(lengths, targets, contextual=2, heads=2, mode="separate", seed=6)
        # Unequal tiles: the dK/dV and dQ grids have different block counts.
        _check(lengths, targets, contextual=2, heads=2, mode="separate", seed=6,
               tile=Tile(16, 32))
        inputs = {name: tensor.detach().float().requires_grad_()
                  for name, tensor in _inputs(lengths, 2, 16, 16, seed=7).items()}
        with pinned(attn_fwd=SMALL, attn_bwd_dkdv=SMALL, attn_bwd_dq=SMALL), \
                dq_mode("separate"):
            out = triton_mha(inputs["q"], inputs["k"], inputs["v"], offsets, max_seq_len=40,
                             num_targets=num_targets, contextual_seq_len=2,
                             sort_by_length=sort_by_length)
            out.backward(grad)
        results.append([out.detach()] + [inputs[name].grad for name in ("q", "k", "v")])
    for other in results[1:]:
        for first, second in zip(results[0], other):
            assert torch.equal(first, second)
    assert attention_module.longest_first(offsets).tolist() == [0, 2, 1]
    assert attention_module.longest_first(_offsets([5])) is None
    monkeypatch.setattr(attention_module, "LAUNCH_ORDER", "rows_last")
    with pytest.raises(ValueError, match="launch order 'rows_last'"):
        triton_mha(inputs["q"], inputs["k"], inputs["v"], offsets, max_seq_len=40)


def test_overlapping_views_of_one_buffer_get_their_own_gradients():
    # q and k the same view of one buffer that also holds v: each gets its own gradient
    # (the buffer-sharing backward is only for disjoint q, k, v views).
    lengths = [9, 5]
    offsets = _offsets(lengths)
    g = torch.Generator().manual_seed(3)
    buffer = torch.randn(sum(lengths), 2 * 16, generator=g).to(DEVICE).requires_grad_()
    grad = torch.randn(sum(lengths), 1, 16, generator=g).to(DEVICE)

    def run(mha):
        q = buffer[:, :16].view(-1, 1, 16)
        v = buffer[:, 16:].view(-1, 1, 16)
        out = mha(q, q, v, offsets, max_seq_len=9)
        (d_buffer,) = torch.autograd.grad(out, buffer, grad)
        return out, d_buffer

    with pinned(attn_fwd=SMALL, attn_bwd_dkdv=SMALL, attn_bwd_dq=SMALL):
        out, d_buffer = run(triton_mha)
    expected_out, expected_grad = run(torch_mha)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_buffer, expected_grad, rtol=1e-4, atol=1e-5)


def test_per_step_work_on_seq_offsets_runs_once_per_tensor_and_version():
    calls = []
    per_offsets = attention_module._PerOffsets()

    def compute(offsets):
        calls.append(offsets.tolist())
        return len(calls)

    offsets = _offsets([4, 2])
    assert per_offsets(offsets, 7, compute) == 1
    assert per_offsets(offsets, 7, compute) == 1  # same tensor, same key: kept
    assert per_offsets(offsets, 8, compute) == 2  # another key
    offsets[1:] += 1  # written in place: recomputed
    assert per_offsets(offsets, 8, compute) == 3
    assert per_offsets(_offsets([4, 2]), 8, compute) == 4  # an equal but other tensor
    with torch.inference_mode():
        frozen = _offsets([4, 2])
        assert per_offsets(frozen, 8, compute) == 5
        assert per_offsets(frozen, 8, compute) == 6  # nothing kept for inference tensors


def test_inference_mode_tensors_are_not_cached(monkeypatch):
    # Tensors made under torch.inference_mode have no version counter: the per-seq_offsets
    # caches (row order, length check) must not need one.
    inputs = {name: t.float() for name, t in _inputs([7, 3, 5], 1, 16, 16, seed=2).items()}
    with torch.inference_mode():
        offsets = _offsets([7, 3, 5])
        with pinned(attn_fwd=SMALL):
            out = triton_mha(inputs["q"], inputs["k"], inputs["v"], offsets, max_seq_len=7,
                             sort_by_length=True)
        assert attention_module.longest_first(offsets).tolist() == [0, 2, 1]
    with torch.no_grad():
        expected = torch_mha(inputs["q"], inputs["k"], inputs["v"], _offsets([7, 3, 5]),
                             max_seq_len=7)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("launch_order", ["blocks_first", "heads_first"])
@pytest.mark.parametrize("last_first", [True, False])
@pytest.mark.parametrize("sorted_rows", [True, False])
def test_launch_table_has_one_program_per_block_that_holds_tokens(launch_order, last_first,
                                                                  sorted_rows, monkeypatch):
    # Rows of 5, 0, 17, 1, 8 tokens in blocks of 4: 2 + 0 + 5 + 1 + 2 blocks per head. Every
    # (row, head, block) holding a token gets exactly one program, no other program is real,
    # and the order is the one asked for.
    monkeypatch.setattr(attention_module, "LAUNCH_ORDER", launch_order)
    lengths, block_rows, heads = [5, 0, 17, 1, 8], 4, 2
    offsets = _offsets(lengths)
    order = attention_module.longest_first(offsets) if sorted_rows else None
    table = attention_module._program_table(offsets, order, block_rows, heads, sum(lengths),
                                            last_first).tolist()
    real = [(code // heads, code % heads, block) for code, block in table if code >= 0]
    assert all(code == -1 for code, _ in table[len(real):]), "unused programs come last"
    counts = [-(-n // block_rows) for n in lengths]
    assert sorted(real) == [(row, head, block) for row in range(len(lengths))
                            for head in range(heads) for block in range(counts[row])]
    rows = [2, 4, 0, 3, 1] if sorted_rows else list(range(len(lengths)))

    def blocks(row):
        return list(range(counts[row]))[::-1] if last_first else list(range(counts[row]))

    if launch_order == "blocks_first":
        expected = [(row, head, block) for row in rows for head in range(heads)
                    for block in blocks(row)]
    else:
        steps = range(max(counts))
        expected = [(row, head, block) for step in steps for row in rows
                    for head in range(heads) for block in blocks(row)
                    if (counts[row] - 1 - block if last_first else block) == step]
    assert real == expected


def test_scaling_seqlen_and_slack_max_seq_len():
    _check([21, 10], [3, 1], max_seq_len=40, scaling_seqlen=1000, seed=4)


@pytest.mark.parametrize("mode", ["atomic", "separate"])
def test_candidates_never_read_other_candidates(mode):
    """NaN in one candidate's k and v must not reach any other row's output or gradients:
    no other query may even load them (a masked-out NaN would still poison p @ v)."""
    lengths, targets = [36], [8]
    offsets = _offsets(lengths)
    num_targets = torch.tensor(targets, device=DEVICE)
    inputs = _inputs(lengths, 1, 16, 16, seed=5)
    poisoned_row = 31  # a candidate; its tile also holds candidates 28..30 and history
    clean, dirty = {}, {}
    for name, tensor in inputs.items():
        clean[name] = tensor.detach().float().requires_grad_()
        value = tensor.detach().float().clone()
        if name != "q":
            value[poisoned_row] = float("nan")
        dirty[name] = value.requires_grad_()
    grad = torch.randn(36, 1, 16, device=DEVICE)
    with pinned(attn_fwd=SMALL, attn_bwd_dkdv=SMALL, attn_bwd_dkdv_atomic=SMALL,
                attn_bwd_dq=SMALL), dq_mode(mode):
        outs = []
        for args in (clean, dirty):
            out = triton_mha(args["q"], args["k"], args["v"], offsets, max_seq_len=36,
                             num_targets=num_targets)
            out.backward(grad)
            outs.append(out)
    keep = torch.arange(36, device=DEVICE) != poisoned_row
    assert torch.equal(outs[0][keep], outs[1][keep])
    for name in inputs:
        assert torch.equal(clean[name].grad[keep], dirty[name].grad[keep]), name


def test_strided_views_of_one_buffer():
    """q, k, v as column slices of one projection output (what stu_preprocess returns)."""
    lengths, heads, d = [26, 11], 2, 16
    offsets = _offsets(lengths)
    buffer = torch.randn(sum(lengths), 3 * heads * d, device=DEVICE)
    q, k, v = (part.view(-1, heads, d) for part in buffer.split(heads * d, dim=1))
    options = dict(max_seq_len=26, num_targets=torch.tensor([2, 3], device=DEVICE))
    with pinned(attn_fwd=SMALL):
        strided = triton_mha(q, k, v, offsets, **options)
        packed = triton_mha(q.contiguous(), k.contiguous(), v.contiguous(), offsets, **options)
    assert torch.equal(strided, packed)


def test_empty_batch():
    q = torch.zeros(0, 2, 16, device=DEVICE, requires_grad=True)
    out = triton_mha(q, q, q, torch.zeros(3, dtype=torch.int64, device=DEVICE), max_seq_len=4)
    out.sum().backward()
    assert out.shape == (0, 2, 16) and q.grad.shape == (0, 2, 16)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=torch.zeros(5, 2, 8)), "must have q's shape"),
        (dict(seq_offsets=torch.tensor([0, 5], dtype=torch.int32)), "int64"),
        (dict(num_targets=torch.tensor([1, 2])), r"num_targets must be \[B\]"),
        (dict(max_seq_len=3), "max_seq_len"),
        (dict(seq_offsets=torch.tensor([0, 4], dtype=torch.int64)), r"seq_offsets\[-1\]"),
    ],
)
def test_bad_input_is_named(change, message):
    if DEVICE == "cuda" and "seq_offsets" in change:
        pytest.skip("checked on the CPU path only (no host sync on the GPU)")
    args = dict(q=torch.zeros(5, 2, 16), k=torch.zeros(5, 2, 16), v=torch.zeros(5, 2, 16),
                seq_offsets=torch.tensor([0, 5]), max_seq_len=5, num_targets=None)
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        triton_mha(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("seq_offsets"), **args)


# ----------------------------------------------------------------------------- full size, GPU


def _random_lengths(batch, max_len, low_fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    low = int(low_fraction * max_len)
    return torch.randint(low, max_len + 1, (batch,), generator=generator).tolist()


# Pinned to the first (fastest) config of each tuning list, so that the GPU run compiles a
# few kernels instead of timing every config for every key.
GPU_TILES = dict(attn_fwd=Tile(128, 64, 8, 3), attn_bwd_dkdv=Tile(32, 128, 8, 3),
                 attn_bwd_dkdv_atomic=Tile(32, 128, 8, 3), attn_bwd_dq=Tile(128, 64, 8, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "contextual, window, mode",
    [(0, 0, "atomic"), (6, 0, "separate"), (6, 200, "atomic")],
    ids=["plain-atomic", "contextual-separate", "window-atomic"],
)
def test_full_size_on_gpu(dtype, contextual, window, mode):
    lengths = _random_lengths(8, 1100, 0.0, seed=11)
    generator = torch.Generator().manual_seed(12)
    targets = [min(n, int(t)) for n, t in
               zip(lengths, torch.randint(0, 21, (8,), generator=generator))]
    tiles = dict(GPU_TILES)
    if dtype == torch.float32:
        # float32 tiles do not use the tensor cores and need more shared memory: the 3-stage
        # 128x64 dQ tile asks for 288 KiB, more than an H100/H200 has (the tuning skips it).
        tiles["attn_bwd_dq"] = Tile(128, 64, 8, 2)
    with pinned(**tiles):
        _check(lengths, targets, dtype=dtype, contextual=contextual, window=window, heads=4,
               d_qk=128, d_v=128, tile=None, mode=mode, seed=13, max_seq_len=1100)


@pytest.mark.gpu
def test_full_size_odd_head_dims_on_gpu():
    lengths = _random_lengths(6, 700, 0.5, seed=21)
    with pinned(**GPU_TILES):
        _check(lengths, [min(n, 7) for n in lengths], dtype=torch.bfloat16, contextual=3,
               heads=2, d_qk=96, d_v=40, tile=None, seed=22)

