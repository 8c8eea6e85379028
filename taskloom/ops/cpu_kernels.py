"""The CPU path's C kernels (`csrc/cpu_ops.c`) behind the torch references' signatures.

A decode step of a small model in bf16 on the CPU spends as long in operator overhead as in
its matrix multiplies: per layer, two RMSNorms of eight torch operations each, rotary
embedding and the KV-cache write in twenty, SiLU-and-mul in three, and decode attention as a
gather of every context key into a padded batch before torch's kernel. `CPU_OPS` does each
in one C call (compiled on first use, `taskloom.ops.cpu_native`) and keeps the torch
references for the rest (prefill attention, the LoRA ops).

Each function here takes what its C loop takes (bfloat16 tensors whose last dimension is
contiguous) and hands anything else to its reference, so a model can call it with whatever
it has. The rounding is the references' (see `csrc/cpu_ops.c`): bit for bit for the residual
add, rotary and the cache write; within float32 roundings for RMSNorm's mean, SiLU's exp and
attention's softmax. `taskloom.ops.backend.select_ops` chooses these for a bf16 model on the
CPU when the library builds.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch

from taskloom.ops import activation, attention, rmsnorm, rotary
from taskloom.ops.cpu_native import load_kernel
from taskloom.runtime.attention import AttentionMetadata

# the C calls' names in torch.profiler traces (`taskloom.bench.profile` counts them as ops)
PROFILE_PREFIX = "taskloom::"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rms_norm_bf16": [_P, _I, _P, _I, _P, _P, _I, _P, _I, _I, _I, _F],
    "silu_and_mul_bf16": [_P, _I, _P, _I, _I, _I],
    "rotary_to_cache_bf16": [_P, _I, _P, _I, _I, _P, _I, _P, _I, _I, _I, _P, _I, _P, _P,
                             _P, _P],
    "decode_attention_bf16": [_P, _I, _P, _I, _P, _P, _P, _I, _P, _I, _I, _I, _F, _P, _I],
}


# Where `record_kernel_calls` collects the calls made (None: not recording).
_recording: list[tuple[Callable[..., Any], tuple]] | None = None


def call_kernel(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), every C kernel's call: recorded within `record_kernel_calls`, and under
    torch.profiler inside a range named after the kernel (the profiler sees no C call
    otherwise, and would count its time as Python's)."""
    if _recording is not None:
        _recording.append((fn, args))
    if not torch.autograd._profiler_enabled():
        return fn(*args)
    with torch.profiler.record_function(PROFILE_PREFIX + fn.__name__):
        return fn(*args)


@contextmanager
def record_kernel_calls() -> Iterator[list[tuple[Callable[..., Any], tuple]]]:
    """Collect every `call_kernel` made inside, in order, as (function, arguments): what a
    CPU decode graph replays (`taskloom.runtime.cpu_graphs`)."""
    global _recording
    if _recording is not None:
        raise RuntimeError("kernel calls are already being recorded")
    _recording = calls = []
    try:
        yield calls
    finally:
        _recording = None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled `cpu_ops` library with its functions' signatures, or None where it
    cannot be built here."""
    lib = load_kernel("cpu_ops")
    if lib is None:
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int if name.endswith(("cache_bf16", "attention_bf16")) else None
    return lib


_BF16 = torch.bfloat16
MAX_GROUP = 16      # query heads a KV head may have in the C decode attention (MAX_GROUP)


def _bf16_rows(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is bf16 on the CPU with a contiguous last dimension."""
    return all(t.dtype is _BF16 and t.is_cpu and t.stride(-1) == 1 for t in tensors)


def _bf16_contiguous(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is bf16, contiguous, on the CPU (checked first, the cheapest)."""
    return all(t.dtype is _BF16 and t.is_contiguous() and t.is_cpu for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`taskloom.ops.rmsnorm.rms_norm` in one C loop (contiguous inputs; Qwen3's per-head
    norms of strided q/k views take the reference)."""
    lib = library()
    if lib is None or not _bf16_contiguous(x, weight) or weight.dim() != 1:
        return rmsnorm.rms_norm(x, weight, eps)
    h = x.shape[-1]
    out = torch.empty_like(x)
    if weight.shape[0] != h:
        raise ValueError(f"RMSNorm weight of {weight.shape[0]} for rows of {h}")
    if x.numel():
        call_kernel(lib.rms_norm_bf16, x.data_ptr(), h, None, 0, weight.data_ptr(),
                    out.data_ptr(), h, None, 0, x.numel() // h, h, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`taskloom.ops.rmsnorm.fused_add_rms_norm` in one C loop."""
    lib = library()
    if (lib is None or not _bf16_contiguous(x, residual, weight) or weight.dim() != 1
            or x.shape != residual.shape):
        return rmsnorm.fused_add_rms_norm(x, residual, weight, eps)
    h = x.shape[-1]
    if weight.shape[0] != h:
        raise ValueError(f"RMSNorm weight of {weight.shape[0]} for rows of {h}")
    out, new_residual = torch.empty_like(x), torch.empty_like(x)
    if x.numel():
        call_kernel(lib.rms_norm_bf16, x.data_ptr(), h, residual.data_ptr(), h,
                    weight.data_ptr(), out.data_ptr(), h, new_residual.data_ptr(), h,
                    x.numel() // h, h, eps)
    return out, new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`taskloom.ops.activation.silu_and_mul` in one C loop."""
    lib = library()
    if lib is None or not _bf16_contiguous(x) or x.shape[-1] % 2:
        return activation.silu_and_mul(x)
    inter = x.shape[-1] // 2
    out = x.new_empty((*x.shape[:-1], inter))
    if x.numel():
        call_kernel(lib.silu_and_mul_bf16, x.data_ptr(), 2 * inter, out.data_ptr(), inter,
                    x.numel() // (2 * inter), inter)
    return out


def _heads_fit(x: torch.Tensor) -> bool:
    """x [num_tokens, heads, head_dim] with heads packed within a token's row."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def _cache_halves(kv_cache: torch.Tensor) -> tuple[int, int]:
    """Addresses of the key and value halves of a contiguous KV cache [2, ...]."""
    base = kv_cache.data_ptr()
    return base, base + kv_cache.stride(0) * kv_cache.element_size()


def _rotate(lib: ctypes.CDLL, positions: torch.Tensor, query: torch.Tensor,
            key: torch.Tensor, value: torch.Tensor | None, cos_sin_cache: torch.Tensor,
            k_dst: int, v_dst: int | None, slots: torch.Tensor) -> torch.Tensor:
    """The C rotary: returns the rotated query; the rotated key (and the value) go to the
    rows `slots` of the [rows, num_kv_heads, head_dim] tensors at k_dst (v_dst)."""
    q_out = torch.empty(query.shape, dtype=query.dtype)
    n, num_heads, head_dim = query.shape
    if n:
        status = call_kernel(
            lib.rotary_to_cache_bf16, positions.data_ptr(), n, query.data_ptr(),
            query.stride(0), num_heads, key.data_ptr(), key.stride(0),
            None if value is None else value.data_ptr(), 0 if value is None else value.stride(0),
            key.shape[1], head_dim, cos_sin_cache.data_ptr(), cos_sin_cache.shape[0],
            q_out.data_ptr(), k_dst, v_dst, slots.data_ptr())
        if status == 1:
            raise IndexError(f"a position is outside the rotary table of "
                             f"{cos_sin_cache.shape[0]} positions")
        assert status == 0, f"rotary_to_cache_bf16 returned {status}"
    return q_out


def _rotary_fits(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> bool:
    return (library() is not None and _bf16_rows(query, key) and _heads_fit(query)
            and _heads_fit(key) and positions.dtype == torch.int64
            and positions.is_contiguous() and cos_sin_cache.dtype == torch.float32
            and cos_sin_cache.is_contiguous() and query.shape[2] <= 1024)


def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`taskloom.ops.rotary.apply_rotary` in one C call."""
    if not _rotary_fits(positions, query, key, cos_sin_cache):
        return rotary.apply_rotary(positions, query, key, cos_sin_cache)
    lib = library()
    assert lib is not None
    k_out = torch.empty(key.shape, dtype=key.dtype)
    rows = torch.arange(key.shape[0], dtype=torch.int64)
    return _rotate(lib, positions, query, key, None, cos_sin_cache, k_out.data_ptr(), None,
                   rows), k_out


def apply_rotary_to_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, cos_sin_cache: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """`taskloom.ops.rotary.apply_rotary_to_cache` in one C call; tokens with a negative
    slot (none on the CPU path) are not stored, as in the Triton kernel."""
    if not (_rotary_fits(positions, query, key, cos_sin_cache) and _bf16_rows(value)
            and _heads_fit(value) and kv_cache.dtype == torch.bfloat16
            and kv_cache.is_contiguous() and slot_mapping.dtype == torch.int64
            and slot_mapping.is_contiguous()):
        return rotary.apply_rotary_to_cache(positions, query, key, value, cos_sin_cache,
                                            kv_cache, slot_mapping)
    lib = library()
    assert lib is not None
    return _rotate(lib, positions, query, key, value, cos_sin_cache, *_cache_halves(kv_cache),
                   slot_mapping)


def _decode_batch(query: torch.Tensor, kv_cache: torch.Tensor, plan: attention.RefPlan,
                  scale: float, out: torch.Tensor) -> None:
    """The reference's padded decode batch, read from the cache in place by one C call."""
    lib = library()
    num_kv_heads = kv_cache.shape[3]
    if (lib is None or plan.decode_lens is None or not _bf16_contiguous(query, out, kv_cache)
            or query.shape[1] % num_kv_heads or query.shape[1] // num_kv_heads > MAX_GROUP):
        attention.decode_batch(query, kv_cache, plan, scale, out)
        return
    slots, rows = plan.decode_slots, plan.decode_rows
    assert slots is not None and rows is not None and slots.stride(1) == 1
    status = call_kernel(
        lib.decode_attention_bf16, query.data_ptr(), query.stride(0), rows.data_ptr(),
        slots.shape[0], *_cache_halves(kv_cache), slots.data_ptr(), slots.stride(0),
        plan.decode_lens.data_ptr(), query.shape[1], num_kv_heads, query.shape[2], scale,
        out.data_ptr(), out.stride(0))
    if status == 2:
        raise MemoryError("decode attention could not allocate its scores")
    assert status == 0, f"decode_attention_bf16 returned {status}"


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """`taskloom.ops.attention.paged_attention_ref` with its decode batch in C (prefill
    chunks and shared-prefix groups as the reference attends them)."""
    return attention.paged_attention_ref(query, kv_cache, meta, scale, decode=_decode_batch)
