"""Batched multi-LoRA shrink and expand (Triton), segment by segment as in Punica's SGMV.

Drop-ins for `taskloom.ops.lora`: `lora_shrink` gives every token `x_i A_{slot_i}^T` in float32,
`lora_expand` adds `t_i B_{slot_i}^T` into the base output in place. A segment is a run of
consecutive tokens with one adapter slot (`LoRAMetadata`), so one program multiplies a block of
a segment's rows by one tile of that segment's adapter, loaded once for all of them.

The grid is (segments, row blocks of the longest segment, output column blocks): programs past
their segment's end, and every program of a segment without an adapter (slot -1), return at
once. It depends only on the number of segments and `max_seg_len`, so a CUDA graph that fixes
both (decodes: one token per segment) replays it unchanged. Products are summed in float32
with `tl.dot`; the rank K (e.g. 48 for fused qkv at rank 16) and the in/out sizes need not be
powers of two or multiples of a block: tiles are padded to a power of two and masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from taskloom.lora.metadata import LoRAMetadata
from taskloom.ops.lora import OutSlices
from taskloom.ops.triton.paged_kv import dot_precision

MAX_BLOCK_M = 64           # segment rows per program
BLOCK_IN = 64              # reduction tile over the input features (shrink)
BLOCK_OUT = 64             # output features per program (expand)


@triton.jit
def _segment_matmul_kernel(
        x_ptr, w_ptr, out_ptr, seg_starts_ptr, seg_slots_ptr, stride_xm, stride_xk, stride_ws,
        stride_wn, stride_wk, stride_om, stride_on,
        N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, ACCUMULATE: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """One tile of `x_i W_{slot_i}^T` for a block of one segment's rows: x [n, K] and W
    [num_slots, N, K] (any strides), summed in float32. The shrink stores it (out: t, with
    N = rank, K = in); the expand, `ACCUMULATE`, adds it to out (y, N = out, K = rank)."""
    seg = tl.program_id(0)
    row0 = tl.program_id(1) * BLOCK_M
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    seg_start = tl.load(seg_starts_ptr + seg)
    seg_len = tl.load(seg_starts_ptr + seg + 1) - seg_start
    if (slot < 0) | (row0 >= seg_len):
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < seg_len                                             # [BLOCK_M]
    tok = (seg_start + rows).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N                                                   # [BLOCK_N]
    w_base = w_ptr + slot * stride_ws + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K                                                   # [BLOCK_K]
        x = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_base + kk[:, None] * stride_wk,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    out_ptrs = out_ptr + tok[:, None] * stride_om + cols[None, :] * stride_on
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)     # [BLOCK_M, BLOCK_N]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMetadata) -> torch.Tensor:
    """x: [n, in]; lora_a: [num_slots, K, in]. Returns float32 [n, K]: `x_i A_{slot_i}^T`,
    zeros for tokens without an adapter. x and lora_a may be float32, float16 or bfloat16."""
    _check_tokens("x", x, meta)
    if lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_a must be [num_slots, K, {x.shape[1]}] for x of shape "
                         f"{tuple(x.shape)}, got {tuple(lora_a.shape)}")
    n, in_features = x.shape
    rank = lora_a.shape[1]
    t = torch.zeros(n, rank, dtype=torch.float32, device=x.device)       # [n, K]
    num_segs = meta.seg_slots.shape[0]
    if num_segs == 0 or meta.max_seg_len == 0 or rank == 0:
        return t
    block_m = _block_m(meta.max_seg_len)
    block_n = min(64, max(16, triton.next_power_of_2(rank)))
    grid = (num_segs, triton.cdiv(meta.max_seg_len, block_m), triton.cdiv(rank, block_n))
    _segment_matmul_kernel[grid](
        x, lora_a, t, meta.seg_starts, meta.seg_slots, x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), t.stride(0), t.stride(1),
        N=rank, K=in_features, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_IN,
        UPCAST=x.dtype != lora_a.dtype, ACCUMULATE=False,
        DOT_PRECISION=dot_precision(torch.promote_types(x.dtype, lora_a.dtype)), num_warps=4)
    return t


def lora_expand(t: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMetadata,
                y: torch.Tensor, out_slices: OutSlices | None = None) -> None:
    """t: float32 [n, num_subs * R]; lora_b: [num_slots, out, R]; y: [n, out], updated in
    place, as `taskloom.ops.lora.lora_expand`: sub-projection j's rows `out_slices[j]` (None:
    all rows, one sub-projection) add `t_i[j*R:(j+1)*R] B_{slot_i}[rows]^T`, one launch per
    sub-projection on views. Rows without an adapter are not touched. For float16/bfloat16
    `lora_b` the products run on TF32 tensor cores (exact for B, t rounded to 10 mantissa
    bits); float32 `lora_b` gets exact products."""
    if lora_b.dim() != 3 or y.dim() != 2 or lora_b.shape[1] != y.shape[1]:
        raise ValueError(f"lora_b must be [num_slots, out, R] with y [n, out], got lora_b "
                         f"{tuple(lora_b.shape)} and y {tuple(y.shape)}")
    r = lora_b.shape[2]
    slices = out_slices or ((0, y.shape[1]),)
    if t.dim() != 2 or t.shape[1] != len(slices) * r:
        raise ValueError(f"t must be [num_tokens, {len(slices) * r}] ({len(slices)} "
                         f"sub-projections of rank {r}), got {tuple(t.shape)}")
    for j, (o, size) in enumerate(slices):
        _expand(t[:, j * r:(j + 1) * r], lora_b[:, o:o + size], meta, y[:, o:o + size])


def _expand(t: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMetadata,
            y: torch.Tensor) -> None:
    """One sub-projection: t [n, K] float32, lora_b [num_slots, out, K], y [n, out] views."""
    _check_tokens("t", t, meta)
    _check_tokens("y", y, meta)
    if t.dtype != torch.float32:
        raise ValueError(f"t must be float32 (lora_shrink's output), got {t.dtype}")
    n, rank = t.shape
    out_features = y.shape[1]
    if lora_b.dim() != 3 or tuple(lora_b.shape[1:]) != (out_features, rank) or y.shape[0] != n:
        raise ValueError(f"lora_b must be [num_slots, {out_features}, {rank}] and y [{n}, out] "
                         f"for t of shape {tuple(t.shape)}, got lora_b {tuple(lora_b.shape)} "
                         f"and y {tuple(y.shape)}")
    num_segs = meta.seg_slots.shape[0]
    if num_segs == 0 or meta.max_seg_len == 0 or rank == 0:
        return
    block_m = _block_m(meta.max_seg_len)
    grid = (num_segs, triton.cdiv(meta.max_seg_len, block_m),
            triton.cdiv(out_features, BLOCK_OUT))
    _segment_matmul_kernel[grid](
        t, lora_b, y, meta.seg_starts, meta.seg_slots, t.stride(0), t.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        N=out_features, K=rank, BLOCK_M=block_m, BLOCK_N=BLOCK_OUT,
        BLOCK_K=min(64, max(16, triton.next_power_of_2(rank))),
        UPCAST=lora_b.dtype != torch.float32, ACCUMULATE=True,
        DOT_PRECISION=dot_precision(lora_b.dtype), num_warps=4)


def _block_m(max_seg_len: int) -> int:
    """Rows per program: the longest segment rounded up to a power of two, 16 (tl.dot's
    minimum) to MAX_BLOCK_M; decodes (single-token segments) get 16."""
    return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(max_seg_len)))


def _check_tokens(name: str, tensor: torch.Tensor, meta: LoRAMetadata) -> None:
    """Raise ValueError unless `tensor` is [num_tokens, features] for the metadata's tokens."""
    if tensor.dim() != 2 or tensor.shape[0] < meta.num_tokens:
        raise ValueError(f"{name} must be [num_tokens, features] with num_tokens >= "
                         f"{meta.num_tokens} (the metadata's tokens), got {tuple(tensor.shape)}")
