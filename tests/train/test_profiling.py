"""The step profile's summary (hstu.train.profiling): kernel categories, busy time as a union of
intervals, per-step averages. The torch.profiler part needs a GPU and runs in train_bench."""

from __future__ import annotations

import pytest

from hstu.train.profiling import busy_time, kernel_category, summarize


@pytest.mark.parametrize(
    "name, category",
    [
        ("_attn_fwd", "attention"),
        ("_attn_bwd_dkdv", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "matmul"),
        ("split_embedding_codegen_forward_unweighted_kernel", "embedding"),
        ("void fbgemm_gpu::jagged_dense_elementwise", "embedding"),
        ("_ln_fwd", "memory_bound"),
        ("void at::native::vectorized_elementwise_kernel<4, ...>", "memory_bound"),
        ("Memcpy HtoD (Pinned -> Device)", "memory_bound"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
         "communication"),
        ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ],
)
def test_kernel_categories(name, category):
    assert kernel_category(name) == category


def test_busy_time_counts_overlaps_once():
    assert busy_time([]) == 0
    assert busy_time([(0, 10), (5, 15), (20, 25)]) == 20
    assert busy_time([(20, 25), (0, 10), (2, 3)]) == 15
    assert busy_time([(0, 10), (10, 12)]) == 12


def test_summary_is_per_step():
    kernels = [
        ("_attn_fwd", 0.0, 4000.0),
        ("sm90_xmma_gemm", 4000.0, 6000.0),
        ("Memcpy HtoD (Pinned -> Device)", 6000.0, 6500.0),
        ("_attn_fwd", 10000.0, 14000.0),
        ("sm90_xmma_gemm", 14000.0, 16000.0),
        ("split_embedding_backward_kernel", 16000.0, 17000.0),
    ]
    host = ["cudaLaunchKernel"] * 5 + ["cudaStreamSynchronize", "cudaMemcpyAsync"]
    profile = summarize(kernels, host, wall_ms=40.0, steps=2)
    assert profile.wall_ms == 20.0
    assert profile.busy_ms == pytest.approx(13.5 / 2)
    assert profile.category_ms == pytest.approx(
        {"attention": 4.0, "matmul": 2.0, "embedding": 0.5, "memory_bound": 0.25,
         "communication": 0.0}
    )
    assert profile.exposed_communication_ms == 0.0
    assert profile.launches == 2.5  # the copy is not a kernel launch
    assert profile.host_syncs == 0.5
    assert profile.top_kernels[0] == ("_attn_fwd", 4.0, 1.0)
    assert profile.busy_fraction_of(13.5) == pytest.approx(0.5)
    assert profile.busy_fraction_of(1.0) == 1.0
    with pytest.raises(ValueError, match="steps"):
        summarize(kernels, host, wall_ms=1.0, steps=0)


class _Event:
    def __init__(self, name, is_user_annotation=False):
        self.name = name
        self.is_user_annotation = is_user_annotation


@pytest.mark.parametrize(
    "name, flagged, annotation",
    [
        # Seen on the GPU timeline of a real step (H100, torch 2.11): user ranges, not kernels.
        ("DistributedDataParallel.forward", False, True),
        ("[lookup]_[embedding_collection.collections.dim256]_[table_wise]", False, True),
        ("Optimizer.step#Adam.step", False, True),
        ("anything", True, True),
        ("_attn_fwd", False, False),
        ("void at::native::elementwise_kernel<128, 2, ...lambda#1...>", False, False),
    ],
)
def test_annotations_are_not_kernels(name, flagged, annotation):
    from hstu.train.profiling import is_annotation

    assert is_annotation(_Event(name, flagged)) is annotation


def test_communication_counts_whole_and_where_nothing_else_ran():
    # An all-to-all partly hidden behind a GEMM (2 of its 5 ms), then an all-reduce alone.
    kernels = [
        ("sm90_xmma_gemm", 0.0, 3000.0),
        ("ncclDevKernel_SendRecv", 1000.0, 6000.0),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 8000.0, 9000.0),
    ]
    profile = summarize(kernels, [], wall_ms=10.0, steps=1)
    assert profile.category_ms["communication"] == pytest.approx(6.0)
    assert profile.exposed_communication_ms == pytest.approx(4.0)
    assert profile.busy_ms == pytest.approx(7.0)
    assert profile.as_dict()["exposed_communication_ms"] == pytest.approx(4.0)


def test_fbgemm_backward_index_kernel_is_embedding_work():
    assert kernel_category("void linearize_index_kernel<long, long, 64>") == "embedding"
