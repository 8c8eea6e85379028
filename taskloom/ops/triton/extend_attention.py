"""Paged prefill/extend attention: causal attention of variable-length query chunks over each
sequence's cached prefix plus the chunk itself, all sequences in one launch.

Query j of sequence i sits at position `seq_len_i - q_len_i + j` and attends keys 0 .. that
position (with a sliding window, those within it and the attention sinks; the other keys are
never read, since their blocks may be back in the pool). One program takes a block of `BLOCK_Q` consecutive query tokens of one sequence and
all query heads of one kv head, laid out as `BLOCK_Q * group` rows (row r: token r // group,
head r % group), so each key/value tile is loaded once per GQA group. Single-token queries
(decodes) are just chunks of length 1, so a mixed batch runs through this kernel as well.
A token tree's chunk (speculative decoding) attends within itself by the tree's mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from taskloom.config import AttentionWindow
from taskloom.ops.triton.paged_kv import (
    LOG2E,
    TileConfig,
    check_paged_inputs,
    dot_precision,
    load_kv_tile,
    online_softmax_step,
)

BLOCK_ROWS = 64            # query rows (tokens x heads of a group) per program
EXTEND_TILES = TileConfig()   # read at each launch (see TileConfig)


@triton.jit
def _extend_tiles(q, k_cache_ptr, v_cache_ptr, table_ptr, lo, hi, q_pos, kv_head, qk_scale,
                  stride_kb, stride_kt, stride_kh, m, l, acc, tree_ptr, tree_lo, prefix,
                  q_len,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr,
                  HAS_TREE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys [lo, hi) into the rows' online softmax, each row (query position q_pos)
    seeing the keys up to itself, within its window (WINDOW > 0) or among the sinks; with
    HAS_TREE and a sequence's tree mask (at `tree_ptr`, [q_len, q_len] int8, over its keys
    from `tree_lo` on, which is past its keys for a causal sequence), a key of the chunk only
    where the mask lets the row see it."""
    for n0 in range(lo, hi, BLOCK_N):
        idx = n0 + tl.arange(0, BLOCK_N)
        valid = idx < hi                                                  # [BLOCK_N]
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, idx, valid, kv_head,
                            stride_kb, stride_kt, stride_kh, HEAD_DIM, BLOCK_SIZE, BLOCK_D)
        visible = valid[None, :] & (idx[None, :] <= q_pos[:, None])       # [BLOCK_M, BLOCK_N]
        if WINDOW > 0:
            visible = visible & ((idx[None, :] > q_pos[:, None] - WINDOW)
                                 | (idx[None, :] < SINKS))
        if HAS_TREE:
            in_chunk = visible & (idx[None, :] >= tree_lo)
            offs = (q_pos[:, None] - prefix) * q_len + (idx[None, :] - prefix)
            seen = tl.load(tree_ptr + offs, mask=in_chunk, other=1)     # [BLOCK_M, BLOCK_N]
            visible = visible & (seen != 0)
        m, l, acc = online_softmax_step(q, k, v, visible, m, l, acc, qk_scale, DOT_PRECISION)
    return m, l, acc


@triton.jit
def _extend_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
        block_tables_ptr, kv_starts_ptr, tree_mask_ptr, tree_starts_ptr, qk_scale, stride_qt,
        stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr,
        HAS_START: tl.constexpr, HAS_TREE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP                               # [BLOCK_M]
    heads = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, BLOCK_D)
    row_mask = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_mask = row_mask[:, None] & (d < HEAD_DIM)[None, :]
    q_offs = (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)                   # [BLOCK_M, BLOCK_D]
    q_pos = prefix + tok                                                  # [BLOCK_M]
    kv_end = tl.minimum(seq_len, prefix + (q_block + 1) * BLOCK_Q)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_ptr = block_tables_ptr + seq * stride_bt
    lo = 0
    if HAS_START:       # SnapKV: the sequence holds KV from its kv_start on
        lo = tl.load(kv_starts_ptr + seq)
    tree_ptr = tree_mask_ptr
    tree_lo = seq_len   # no key: causal
    if HAS_TREE:        # a token tree's chunk attends by its mask
        tree_start = tl.load(tree_starts_ptr + seq)
        tree_ptr += tl.maximum(tree_start, 0)
        tree_lo = tl.where(tree_start >= 0, prefix, seq_len)
    if WINDOW > 0:
        # Keys before the block's first query's window are read only as sinks: the pool may
        # have taken back the blocks between.
        lo = tl.maximum(prefix + q_block * BLOCK_Q - WINDOW + 1, 0)
        m, l, acc = _extend_tiles(q, k_cache_ptr, v_cache_ptr, table_ptr, 0,
                                  tl.minimum(SINKS, lo), q_pos, kv_head, qk_scale, stride_kb,
                                  stride_kt, stride_kh, m, l, acc, tree_ptr, tree_lo,
                                  prefix, q_len, HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N,
                                  WINDOW, SINKS, HAS_TREE, DOT_PRECISION)
    m, l, acc = _extend_tiles(q, k_cache_ptr, v_cache_ptr, table_ptr, lo, kv_end, q_pos,
                              kv_head, qk_scale, stride_kb, stride_kt, stride_kh, m, l, acc,
                              tree_ptr, tree_lo, prefix, q_len, HEAD_DIM, BLOCK_SIZE,
                              BLOCK_D, BLOCK_N, WINDOW, SINKS, HAS_TREE, DOT_PRECISION)
    # Every valid row sees at least its own key, so l > 0 there.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]                          # [BLOCK_M, BLOCK_D]
    out_offs = (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_extend_attention(query: torch.Tensor, kv_cache: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float,
                           max_query_len: int, window: AttentionWindow | None = None,
                           kv_starts: torch.Tensor | None = None,
                           tree_mask: torch.Tensor | None = None,
                           tree_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's query chunk over its cached context.

    query: [num_tokens, num_heads, head_dim], sequence i owning rows
    `query_start_loc[i]:query_start_loc[i+1]` ([num_seqs + 1] int32); seq_lens: [num_seqs]
    int32, each counting the chunk itself; block_tables: [num_seqs, max_blocks] int32;
    `max_query_len` (a host int) sizes the grid. The chunk's keys and values must already be
    in the cache. With `window`, each query attends within its sliding window and to the
    sinks, and no other key is read; with `kv_starts` ([num_seqs] int32, SnapKV), sequence
    i reads keys from position kv_starts[i] on. With `tree_mask` and `tree_starts` (token
    trees, see AttentionMetadata.tree_mask), a sequence whose start is >= 0 attends to its
    chunk by its tree mask. Returns [num_tokens, num_heads, head_dim] in query's dtype.
    """
    check_paged_inputs(query, kv_cache)
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(query)                        # [num_tokens, num_heads, head_dim]
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    block_m = max(BLOCK_ROWS, triton.next_power_of_2(group))
    block_q = block_m // group                           # query tokens per program
    k_cache, v_cache = kv_cache[0], kv_cache[1]          # [num_blocks, block_size, kv_heads, d]
    _extend_kernel[(triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)](
        query, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, kv_starts,
        # without trees, stand-ins that are never read (no None reaches _extend_tiles)
        query if tree_mask is None else tree_mask.view(torch.int8),
        seq_lens if tree_starts is None else tree_starts, scale * LOG2E,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=EXTEND_TILES.keys_per_tile(head_dim),
        WINDOW=0 if window is None else window.size,
        SINKS=0 if window is None else window.num_sink_tokens, HAS_START=kv_starts is not None,
        HAS_TREE=tree_mask is not None, DOT_PRECISION=dot_precision(query.dtype),
        **EXTEND_TILES.launch_options())
    return out
