"""Triton kernels against their torch references.

Without CUDA the kernels run on the CPU through the Triton interpreter (tests/conftest.py sets
`TRITON_INTERPRET=1` before triton is first imported), with small shapes. With CUDA the same
tests run compiled with realistic shapes (marked `gpu`); a process runs Triton one way or the
other, so there the interpreter cases skip (`CUDA_VISIBLE_DEVICES=` runs them).
"""
from __future__ import annotations

import pytest
import torch

from taskloom.ops.activation import silu_and_mul as silu_and_mul_ref
from taskloom.ops.attention import paged_attention_ref
from taskloom.ops.attention import write_kv_cache as write_kv_cache_ref
from taskloom.ops.rmsnorm import fused_add_rms_norm as fused_add_rms_norm_ref
from taskloom.ops.rmsnorm import rms_norm as rms_norm_ref
from taskloom.ops.rotary import RotaryEmbedding, apply_rotary
from taskloom.ops.rotary import apply_rotary_to_cache as rotary_to_cache_ref
from taskloom.runtime.attention import AttentionMetadata
from tests.ops.paged_cases import BLOCK_SIZE, paged_batch

from tests.ops.triton_marks import DEVICES, DTYPES, GPU, INTERPRETER
from taskloom.ops.triton import activation, attention, kv_cache, rmsnorm, rotary  # noqa: E402
from taskloom.ops.triton.decode_attention import (  # noqa: E402
    MAX_SPLITS,
    decode_num_splits,
    paged_decode_attention,
)
from taskloom.ops.triton.extend_attention import paged_extend_attention  # noqa: E402
# Attention shapes (device, num_heads, num_kv_heads, head_dim): small for the interpreter
# (GQA groups of 3 and 4, head_dim 64 and 128), those of real models on the GPU.
ATTN_SHAPES = [
    pytest.param("cpu", 6, 2, 64, id="interpreter-h6-kv2-d64", marks=INTERPRETER),
    pytest.param("cpu", 4, 1, 128, id="interpreter-h4-kv1-d128", marks=INTERPRETER),
    pytest.param("cuda", 32, 8, 128, id="cuda-h32-kv8-d128", marks=GPU),
    pytest.param("cuda", 28, 4, 128, id="cuda-h28-kv4-d128", marks=GPU),
    pytest.param("cuda", 16, 16, 64, id="cuda-h16-kv16-d64", marks=GPU),
]
# (tokens already cached, new tokens) per sequence; lengths cross block boundaries.
DECODE_SEQS = {"cpu": [(0, 1), (14, 1), (15, 1), (16, 1), (129, 1), (299, 1)],
               "cuda": [(0, 1), (16, 1), (254, 1), (999, 1), (2048, 1), (4095, 1), (3000, 1)]}
EXTEND_SEQS = {"cpu": [(0, 7), (5, 1), (13, 20), (40, 3), (0, 1), (16, 16)],
               "cuda": [(0, 1024), (3000, 1), (1500, 500), (0, 37), (4000, 96), (17, 1)]}
# Attention output vs a float32 reference on the same (rounded) inputs.
ATTN_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
ELEMENTWISE_TOL = {torch.float32: {"atol": 1e-5, "rtol": 1.3e-6},
                   torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
                   torch.float16: {"atol": 2e-3, "rtol": 2e-3}}


def assert_close_elementwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to a rounding or two of the output dtype: the GPU's approximate exp and rsqrt,
    rotary's single rounding (the reference rounds each product), and the interpreter's
    float32 -> bfloat16 casts, which truncate instead of rounding to nearest."""
    torch.testing.assert_close(actual, expected, **ELEMENTWISE_TOL[actual.dtype])


def skip_interpreted_bf16_dot(device: str, dtype: torch.dtype) -> None:
    """The attention kernels use tl.dot, which the interpreter cannot run on bfloat16."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's tl.dot multiplies bfloat16 bit patterns as "
                    "integers; bfloat16 attention is checked on the GPU")


def reference_attention(query: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    """The torch reference in float32 on the same inputs."""
    return paged_attention_ref(query.float(), cache.float(), meta, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", ATTN_SHAPES)
def test_decode_attention_matches_reference(device: str, num_heads: int, num_kv_heads: int,
                                            head_dim: int, dtype: torch.dtype) -> None:
    skip_interpreted_bf16_dot(device, dtype)
    seqs = DECODE_SEQS[device]
    query, cache, meta = paged_batch(seqs, num_heads, num_kv_heads, head_dim, dtype, device, 0)
    scale = head_dim ** -0.5
    expected = reference_attention(query, cache, meta, scale)
    assert decode_num_splits(len(seqs), num_kv_heads, meta.max_seq_len) > 1
    tol = ATTN_TOL[dtype]
    for num_splits in (None, 1, 5):   # the default (split-K), one pass, an uneven split
        out = paged_decode_attention(query, cache, meta.block_tables, meta.seq_lens, scale,
                                     meta.max_seq_len, num_splits)
        assert out.dtype == dtype and out.shape == query.shape
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", ATTN_SHAPES)
def test_decode_attention_with_fixed_splits_as_in_cuda_graphs(device: str, num_heads: int,
                                                              num_kv_heads: int,
                                                              head_dim: int) -> None:
    """A CUDA graph fixes the split count and the block-table width in advance: short
    sequences leave most splits empty, padding rows (seq_len 1, block 0) attend one key, and a
    row with no keys at all gets zeros."""
    seqs = DECODE_SEQS[device]
    query, cache, meta = paged_batch(seqs, num_heads, num_kv_heads, head_dim, torch.float32,
                                     device, 9)
    scale = head_dim ** -0.5
    expected = reference_attention(query, cache, meta, scale)
    n, group = len(seqs), num_heads // num_kv_heads
    tables = torch.zeros(n + 3, meta.block_tables.shape[1] + 5, dtype=torch.int32,
                         device=device)                  # [n + 3, max_blocks + 5]
    tables[:n, :meta.block_tables.shape[1]] = meta.block_tables
    seq_lens = torch.cat([meta.seq_lens, torch.tensor([1, 1, 0], dtype=torch.int32,
                                                      device=device)])
    padding_q = torch.randn(3, num_heads, head_dim, generator=torch.Generator().manual_seed(10))
    q = torch.cat([query, padding_q.to(device)])         # [n + 3, num_heads, head_dim]
    for num_splits in (MAX_SPLITS, 1):
        out = paged_decode_attention(q, cache, tables, seq_lens, scale, meta.max_seq_len,
                                     num_splits)
        torch.testing.assert_close(out[:n], expected, atol=2e-5, rtol=2e-5)
        # One key: the output is that key's value (block 0, token 0, the head's kv head).
        only_value = cache[1, 0, 0].repeat_interleave(group, dim=0)  # [num_heads, head_dim]
        torch.testing.assert_close(out[n:n + 2], only_value.expand(2, -1, -1))
        assert torch.equal(out[n + 2], torch.zeros_like(out[n + 2]))


@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", ATTN_SHAPES)
def test_paged_attention_entry_passes_the_fixed_split_count(
        device: str, num_heads: int, num_kv_heads: int, head_dim: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    query, cache, meta = paged_batch(DECODE_SEQS[device], num_heads, num_kv_heads, head_dim,
                                     torch.float32, device, 11)
    calls: list[int | None] = []

    def spy(*args: object) -> torch.Tensor:
        calls.append(args[6])                            # type: ignore[arg-type]
        return paged_decode_attention(*args)             # type: ignore[arg-type]

    monkeypatch.setattr(attention, "paged_decode_attention", spy)
    expected = reference_attention(query, cache, meta, 0.125)
    for splits in (None, 7):
        meta.decode_num_splits = splits
        out = attention.paged_attention(query, cache, meta, 0.125)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert calls == [None, 7]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", ATTN_SHAPES)
def test_extend_attention_matches_reference(device: str, num_heads: int, num_kv_heads: int,
                                            head_dim: int, dtype: torch.dtype) -> None:
    """Prompts, chunks over a cached prefix and single-token queries in one launch."""
    skip_interpreted_bf16_dot(device, dtype)
    query, cache, meta = paged_batch(EXTEND_SEQS[device], num_heads, num_kv_heads, head_dim,
                                     dtype, device, 1)
    scale = head_dim ** -0.5
    out = paged_extend_attention(query, cache, meta.query_start_loc, meta.seq_lens,
                                 meta.block_tables, scale, meta.max_query_len)
    assert out.dtype == dtype and out.shape == query.shape
    tol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.float(), reference_attention(query, cache, meta, scale),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", ATTN_SHAPES)
def test_extend_kernel_handles_decode_only_batches(device: str, num_heads: int,
                                                   num_kv_heads: int, head_dim: int) -> None:
    query, cache, meta = paged_batch(DECODE_SEQS[device], num_heads, num_kv_heads, head_dim,
                                     torch.float32, device, 2)
    out = paged_extend_attention(query, cache, meta.query_start_loc, meta.seq_lens,
                                 meta.block_tables, 0.1, meta.max_query_len)
    torch.testing.assert_close(out, reference_attention(query, cache, meta, 0.1),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", ATTN_SHAPES)
def test_paged_attention_entry_matches_reference(device: str, num_heads: int,
                                                 num_kv_heads: int, head_dim: int,
                                                 kind: str) -> None:
    """The metadata-driven entry: decode-only batches and mixed batches, in half precision."""
    seqs = DECODE_SEQS[device] if kind == "decode" else EXTEND_SEQS[device]
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    query, cache, meta = paged_batch(seqs, num_heads, num_kv_heads, head_dim, dtype, device, 3)
    out = attention.paged_attention(query, cache, meta, 0.125)
    assert out.dtype == dtype
    tol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.float(), reference_attention(query, cache, meta, 0.125),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_cache_matches_reference_and_skips_negative_slots(device: str,
                                                                   dtype: torch.dtype) -> None:
    num_tokens, kv_heads, head_dim = (7, 2, 64) if device == "cpu" else (300, 8, 128)
    gen = torch.Generator().manual_seed(4)
    cache = torch.randn(2, 40, BLOCK_SIZE, kv_heads, head_dim, generator=gen).to(device, dtype)
    # key/value are strided views of a fused qkv output, as in the model.
    qkv = torch.randn(num_tokens, 3, kv_heads, head_dim, generator=gen).to(device, dtype)
    key, value = qkv[:, 1], qkv[:, 2]                  # [num_tokens, kv_heads, head_dim]
    slots = torch.randperm(40 * BLOCK_SIZE, generator=gen)[:num_tokens]
    slots[num_tokens // 2] = -1                        # a padding token
    expected = cache.clone()
    keep = slots >= 0
    write_kv_cache_ref(key[keep.to(device)], value[keep.to(device)], expected,
                       slots[keep].to(device))
    kv_cache.write_kv_cache(key, value, cache, slots.to(device))
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_matches_reference(device: str, dtype: torch.dtype) -> None:
    rows, hidden = (5, 96) if device == "cpu" else (300, 4096)
    gen = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(rows, hidden, generator=gen)).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    assert_close_elementwise(rmsnorm.rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    # Per-head q/k norm: a strided [tokens, heads, head_dim] view, weight of head_dim.
    qk = torch.randn(rows, 3, 4, 64, generator=gen).to(device, dtype)[:, 1]
    head_weight = weight[:64]
    assert_close_elementwise(rmsnorm.rms_norm(qk, head_weight, 1e-6),
                             rms_norm_ref(qk, head_weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_add_rms_norm_matches_reference(device: str, dtype: torch.dtype) -> None:
    rows, hidden = (6, 80) if device == "cpu" else (300, 4096)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    residual = (4 * torch.randn(rows, hidden, generator=gen)).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    normed, new_residual = rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    if device == "cpu" and dtype == torch.bfloat16:   # the interpreter truncates the sum
        assert_close_elementwise(new_residual, expected_residual)
    else:
        assert torch.equal(new_residual, expected_residual)
    assert_close_elementwise(normed, expected_normed)
    with pytest.raises(ValueError, match="same shape"):
        rmsnorm.fused_add_rms_norm(x, residual[1:], weight, 1e-6)


def _rotary_inputs(device: str, dtype: torch.dtype, gen: torch.Generator
                   ) -> tuple[torch.Tensor, ...]:
    """Positions, a Llama-3 cos/sin table, and q, k, v as strided views of one fused qkv
    output, as in the model."""
    num_tokens, heads, kv_heads, head_dim = (9, 6, 2, 64) if device == "cpu" else (500, 32, 8,
                                                                                  128)
    cos_sin_cache = RotaryEmbedding(head_dim, 4096, 500000.0).cos_sin_cache.to(device)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.to(device, dtype).split([heads * head_dim, kv_heads * head_dim,
                                           kv_heads * head_dim], dim=-1)
    return (positions, cos_sin_cache, q.view(num_tokens, heads, head_dim),
            k.view(num_tokens, kv_heads, head_dim), v.view(num_tokens, kv_heads, head_dim))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_matches_reference(device: str, dtype: torch.dtype) -> None:
    positions, cos_sin_cache, q, k, _ = _rotary_inputs(device, dtype,
                                                       torch.Generator().manual_seed(7))
    q_out, k_out = rotary.apply_rotary(positions, q, k, cos_sin_cache)
    q_ref, k_ref = apply_rotary(positions, q, k, cos_sin_cache)
    assert_close_elementwise(q_out, q_ref)
    assert_close_elementwise(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_to_cache_is_rotary_then_the_cache_write(device: str,
                                                        dtype: torch.dtype) -> None:
    """The fused launch stores exactly what the rotary kernel then the KV-write kernel store
    (bit for bit), skips padding tokens (slot -1), and returns the same rotated query."""
    gen = torch.Generator().manual_seed(17)
    positions, cos_sin_cache, q, k, v = _rotary_inputs(device, dtype, gen)
    num_tokens, kv_heads, head_dim = k.shape
    num_blocks = -(-num_tokens // BLOCK_SIZE) + 3
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim,
                        generator=gen).to(device, dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:num_tokens]
    slots[num_tokens // 3] = -1                        # a padding token
    slots = slots.to(device)
    expected = cache.clone()
    q_two, k_two = rotary.apply_rotary(positions, q, k, cos_sin_cache)
    kv_cache.write_kv_cache(k_two, v, expected, slots)
    q_out = rotary.apply_rotary_to_cache(positions, q, k, v, cos_sin_cache, cache, slots)
    assert torch.equal(q_out, q_two)
    assert torch.equal(cache, expected)
    # and the torch reference of the fused op is the reference rotary then the reference write
    ref_cache = cache.clone()
    keep = (slots >= 0).cpu()
    ref_q = rotary_to_cache_ref(positions[keep.to(device)], q[keep.to(device)],
                                k[keep.to(device)], v[keep.to(device)], cos_sin_cache,
                                ref_cache, slots[keep.to(device)])
    assert_close_elementwise(ref_q, q_two[keep.to(device)])
    assert_close_elementwise(ref_cache, cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_matches_reference(device: str, dtype: torch.dtype) -> None:
    shape = (2, 3, 2 * 1100) if device == "cpu" else (300, 2 * 14336)
    x = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(8))).to(device, dtype)
    out = activation.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close_elementwise(out, silu_and_mul_ref(x))
