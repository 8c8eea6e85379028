"""The profile summary of `bench --profile` (taskloom.bench.profile) on hand-made traces of
the shape torch.profiler exports: device kernels summed by name and category, busy time as
the union of overlapping kernels, and CPU operators' self times out of nested events."""
from __future__ import annotations

import pytest

from taskloom.bench.profile import category, self_times, summarize_trace, union_length


@pytest.mark.parametrize("name,want", [
    # our Triton kernels
    ("_decode_split_kernel", "attention"), ("_decode_reduce_kernel", "attention"),
    ("_extend_kernel", "attention"), ("_write_kv_kernel", "kv_write"),
    ("_rms_norm_kernel", "norm"), ("_rotary_kernel", "rotary"),
    ("_silu_and_mul_kernel", "activation"), ("_segment_matmul_kernel", "lora"),
    # cuBLAS and CUTLASS GEMMs on Hopper
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_"
     "execute_segment_k_off_kernel__5x_cublas", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn>",
     "gemm"),
    # torch's own CUDA kernels
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, "
     "at::native::ArgMaxOps<float>, unsigned int, long, 4> >", "sampling"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<"
     "c10::BFloat16>, std::array<char*, 3ul> >", "elementwise"),
    ("Memcpy HtoD (Pinned -> Device)", "copy"), ("Memset (Device)", "copy"),
    # CPU operators
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::index_select", "copy"),
    ("mkldnn::_linear_pointwise", "gemm"),    # oneDNN-packed projections (CPU bf16/fp16)
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::mul", "elementwise"), ("aten::as_strided", "other"),
    ("aten::mmap_like_op", "other"),          # anchored: not every name starting aten::mm
])
def test_categories(name: str, want: str) -> None:
    assert category(name) == want


def test_union_length_counts_overlaps_once() -> None:
    assert union_length([]) == 0
    assert union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert union_length([(20, 25), (0, 10)]) == 15


def _op(name: str, ts: float, dur: float, tid: int = 1, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}


def test_self_times_subtract_direct_children_per_thread() -> None:
    ops = [_op("aten::linear", 0, 100), _op("aten::t", 5, 10), _op("aten::addmm", 20, 70),
           _op("aten::copy_", 30, 20),              # inside addmm, not linear's direct child
           _op("aten::mul", 110, 5),                # after linear: a top-level op
           _op("aten::mm", 0, 50, tid=2)]           # another thread: no parent
    got = sorted(self_times(ops))
    assert got == sorted([("aten::linear", 20.0), ("aten::t", 10.0), ("aten::addmm", 50.0),
                          ("aten::copy_", 20.0), ("aten::mul", 5.0), ("aten::mm", 50.0)])


def test_device_summary_per_step_by_category_and_name() -> None:
    # two steps, 10 ms of wall time: a GEMM of 2 ms and an attention kernel of 1 ms per step,
    # a copy overlapping the GEMM (busy time counts it once), and host events that a device
    # summary ignores
    events = []
    for step in range(2):
        t = step * 5000.0
        events += [_op("nvjet_tst_128x256", t, 2000, cat="kernel"),
                   _op("_decode_split_kernel", t + 2000, 1000, cat="kernel"),
                   _op("Memcpy DtoH (Device -> Pinned)", t + 1500, 100, cat="gpu_memcpy"),
                   _op("cudaGraphLaunch", t, 30, cat="cuda_runtime"),
                   _op("aten::argmax", t, 40)]
    events.append({"ph": "M", "name": "process_name", "pid": 1})
    s = summarize_trace({"traceEvents": events}, steps=2, wall_s=0.010, on_device=True)
    assert s["of"] == "device kernels and copies"
    assert s["steps"] == 2 and s["wall_ms_per_step"] == 5.0
    assert s["busy_ms_per_step"] == 3.0 and s["busy_fraction"] == 0.6
    assert s["categories_ms_per_step"] == {"gemm": 2.0, "attention": 1.0, "copy": 0.1}
    assert list(s["categories_ms_per_step"]) == ["gemm", "attention", "copy"]   # largest first
    assert [t["name"] for t in s["top"]] == ["nvjet_tst_128x256", "_decode_split_kernel",
                                             "Memcpy DtoH (Device -> Pinned)"]
    assert s["top"][0] == {"name": "nvjet_tst_128x256", "category": "gemm", "ms_per_step": 2.0,
                           "calls_per_step": 1.0}


def test_cpu_summary_uses_operator_self_times() -> None:
    events = [_op("aten::linear", 0, 600), _op("aten::addmm", 100, 400),
              _op("aten::mul", 700, 100), _op("cudaLaunchKernel", 0, 5, cat="cuda_runtime")]
    s = summarize_trace({"traceEvents": events}, steps=1, wall_s=0.001, on_device=False)
    assert s["of"] == "cpu operators (self time)"
    assert s["busy_ms_per_step"] == 0.7 and s["busy_fraction"] == 0.7     # the rest: Python
    assert s["categories_ms_per_step"] == {"gemm": 0.6, "elementwise": 0.1}
    assert [(t["name"], t["ms_per_step"]) for t in s["top"]] == [
        ("aten::addmm", 0.4), ("aten::linear", 0.2), ("aten::mul", 0.1)]
