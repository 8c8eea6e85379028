"""Paged decode attention (one query token per sequence), flash-decoding style.

One program handles all query heads of one kv head (GQA: each key/value tile is loaded once
for the whole group) over one split of a sequence's context. With several splits, a first pass
writes each split's normalised partial output and log-sum-exp, and a reduce pass combines them;
long contexts then keep the GPU busy even for a handful of sequences. With one split the first
pass writes the output directly.

The grid depends only on the number of sequences, kv heads and splits: each program derives
its split's range from its sequence's length on the device, and a split past the end of a short
sequence is empty (log-sum-exp -inf, weight 0 in the reduce). With `num_splits` given, nothing
about the step is read on the host, so CUDA graphs capture the kernels and replay them for any
sequence lengths.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from taskloom.ops.triton.paged_kv import (
    LOG2E,
    check_paged_inputs,
    dot_precision,
    kv_token_offsets,
    online_softmax_step,
)

TARGET_PROGRAMS = 512      # split until about this many programs share the GPU
MIN_SPLIT_TOKENS = 256     # ... but never below this many context tokens per split
MAX_SPLITS = 32


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """How many splits of the context each (sequence, kv head) program pair is given."""
    wanted = triton.cdiv(TARGET_PROGRAMS, num_seqs * num_kv_heads)
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(max_seq_len, MIN_SPLIT_TOKENS)))


@triton.jit
def _decode_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr,
        qk_scale, num_heads, stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
        stride_os, stride_oh, stride_osplit,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows                                        # [BLOCK_H]
    d = tl.arange(0, BLOCK_D)
    q_mask = (rows < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)                                   # [BLOCK_H, BLOCK_D]
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table_ptr = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        idx = n0 + tl.arange(0, BLOCK_N)
        valid = idx < end                                                 # [BLOCK_N]
        offs = kv_token_offsets(table_ptr, idx, valid, kv_head, stride_kb, stride_kt,
                                stride_kh, BLOCK_SIZE)
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        m, l, acc = online_softmax_step(q, k, v, valid[None, :], m, l, acc, qk_scale,
                                        DOT_PRECISION)
    # An empty split (start >= end) leaves l == 0: output 0 with weight exp2(-inf) == 0.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]                          # [BLOCK_H, BLOCK_D]
    out_offs = seq * stride_os + heads[:, None] * stride_oh + split * stride_osplit + d[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if NUM_SPLITS > 1:
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))  # base 2
        tl.store(lse_ptr + (seq * num_heads + heads) * NUM_SPLITS + split, lse,
                 mask=rows < GROUP)


@triton.jit
def _decode_reduce_kernel(
        partial_ptr, lse_ptr, out_ptr, stride_ps, stride_ph, stride_psplit, stride_os,
        stride_oh, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits,
                  mask=splits < NUM_SPLITS, other=float("-inf"))         # [BLOCK_SPLITS]
    # Empty splits weigh 0; a sequence with no keys at all (every lse -inf) outputs 0.
    lse_max = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(lse_max > float("-inf"), lse_max, 0.0))  # [BLOCK_SPLITS]
    mask = (splits < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :]
    parts = tl.load(partial_ptr + seq * stride_ps + head * stride_ph
                    + splits[:, None] * stride_psplit + d[None, :], mask=mask, other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d,
             out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int, num_splits: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its whole cached context.

    query: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks] int32;
    seq_lens: [num_seqs] int32 (each at most `max_seq_len`; a sequence of length 0 gets
    zeros). `num_splits` defaults to `decode_num_splits(...)`; a fixed count (CUDA graphs)
    works for any lengths, the splits a short sequence does not reach being empty. Returns
    [num_seqs, num_heads, head_dim] in query's dtype.
    """
    check_paged_inputs(query, kv_cache)
    num_seqs, num_heads, head_dim = query.shape
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, kv_cache.shape[3], max_seq_len)
    out = torch.empty_like(query)                        # [num_seqs, num_heads, head_dim]
    if num_seqs == 0:
        return out
    if num_splits == 1:
        _launch_split_pass(query, kv_cache, block_tables, seq_lens, scale, out.unsqueeze(2),
                           None)
        return out
    partial = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                          device=query.device)           # [num_seqs, num_heads, splits, d]
    lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                      device=query.device)               # [num_seqs, num_heads, splits]
    _launch_split_pass(query, kv_cache, block_tables, seq_lens, scale, partial, lse)
    _decode_reduce_kernel[(num_seqs, num_heads)](
        partial, lse, out, partial.stride(0), partial.stride(1), partial.stride(2),
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        BLOCK_D=triton.next_power_of_2(head_dim))
    return out


def _launch_split_pass(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, scale: float, partial: torch.Tensor,
                       lse: torch.Tensor | None) -> None:
    """First pass into `partial` [num_seqs, num_heads, num_splits, head_dim] and, with
    several splits, each split's base-2 log-sum-exp into `lse` [num_seqs, num_heads, splits]."""
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    k_cache, v_cache = kv_cache[0], kv_cache[1]          # [num_blocks, block_size, kv_heads, d]
    _decode_split_kernel[(num_seqs, num_kv_heads, partial.shape[2])](
        query, k_cache, v_cache, block_tables, seq_lens, partial, lse, scale * LOG2E,
        num_heads, query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), partial.stride(0), partial.stride(1),
        partial.stride(2), GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        NUM_SPLITS=partial.shape[2], BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=64 if head_dim <= 128 else 32, DOT_PRECISION=dot_precision(query.dtype),
        num_warps=4)
