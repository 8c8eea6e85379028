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

Decodes that share a cached prefix (a system prompt, few-shot examples, the n samples of one
prompt; see `taskloom.runtime.shared_prefix`) can attend to it together, as cascade attention
and Hydragen do: a prefix pass takes a tile of a group's members and multiplies all their
query heads against the prefix's keys in one matrix product, reading the prefix once per tile
instead of once per member, and writes each member's partial softmax into extra slots that
the reduce merges with the splits of the member's own tokens. A step of 200 decodes sharing a
2,000-token prompt then reads the prompt's KV about 13 times a layer instead of 200. The
plan comes from the step's host-side groups, so this runs in eager steps, not in graphs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from taskloom.ops.triton.paged_kv import (
    LOG2E,
    TileConfig,
    attend_key_range,
    check_paged_inputs,
    dot_precision,
    fold_key_range,
    load_kv_tile,
    online_softmax_step,
    partial_result,
)
from taskloom.config import AttentionWindow
from taskloom.runtime.shared_prefix import PrefixGroup
from taskloom.runtime.transfer import to_device

TARGET_PROGRAMS = 512      # split until about this many programs share the GPU
PREFIX_BLOCK_M = 64        # (member, query head) rows of a shared-prefix tile
MIN_SPLIT_TOKENS = 256     # ... but never below this many context tokens per split
MAX_SPLITS = 32
# The split and shared-prefix passes' launch (read at each launch; see TileConfig).
DECODE_TILES = TileConfig()


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """How many splits of the context each (sequence, kv head) program pair is given."""
    wanted = triton.cdiv(TARGET_PROGRAMS, num_seqs * num_kv_heads)
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(max_seq_len, MIN_SPLIT_TOKENS)))


@triton.jit
def _fold_tree_keys(q, k_cache_ptr, v_cache_ptr, table_ptr, lo, hi, bits, kv_head, qk_scale,
                    stride_kb, stride_kt, stride_kh, m, l, acc, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Fold the keys [lo, hi) of a token tree's chunk into the online softmax, the key at
    lo + j only where bit j of `bits` (int64) is set: the node's ancestors and itself."""
    for n0 in range(lo, hi, BLOCK_N):
        idx = n0 + tl.arange(0, BLOCK_N)
        valid = idx < hi                                                  # [BLOCK_N]
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, idx, valid, kv_head,
                            stride_kb, stride_kt, stride_kh, HEAD_DIM, BLOCK_SIZE, BLOCK_D)
        shift = tl.where(valid, idx - lo, 0).to(tl.int64)
        seen = valid & (((bits >> shift) & 1) != 0)                      # [BLOCK_N]
        m, l, acc = online_softmax_step(q, k, v, seen[None, :], m, l, acc, qk_scale,
                                        DOT_PRECISION)
    return m, l, acc


@triton.jit
def _decode_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, first_ptr,
        tree_lo_ptr, tree_bits_ptr, out_ptr, lse_ptr, qk_scale, num_heads, stride_qs,
        stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_os, stride_oh,
        stride_osplit,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        NUM_SPLITS: tl.constexpr, NUM_SLOTS: tl.constexpr, HAS_FIRST: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        WINDOW: tl.constexpr, SINKS: tl.constexpr, HAS_TREE: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # With a shared prefix the splits cover the sequence's own tokens after it; with a
    # sliding window, the window of the query (at seq_len - 1), split 0 adding the sinks.
    # A token tree's node: the splits cover the context before its chunk, and split 0 adds
    # the chunk's keys it sees.
    first = tl.load(first_ptr + seq) if HAS_FIRST else 0
    if WINDOW > 0:
        first = tl.maximum(seq_len - WINDOW, 0)
    own_end = seq_len
    if HAS_TREE:
        own_end = tl.load(tree_lo_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(own_end - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, own_end)
    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows                                        # [BLOCK_H]
    d = tl.arange(0, BLOCK_D)
    q_mask = (rows < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)                                   # [BLOCK_H, BLOCK_D]
    table_ptr = block_tables_ptr + seq * stride_bt
    m, l, acc = attend_key_range(q, k_cache_ptr, v_cache_ptr, table_ptr, start, end, kv_head,
                                 qk_scale, stride_kb, stride_kt, stride_kh, BLOCK_H, HEAD_DIM,
                                 BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_PRECISION)
    if SINKS > 0:
        sinks_end = tl.where(split == 0, tl.minimum(first, SINKS), 0)
        m, l, acc = fold_key_range(q, k_cache_ptr, v_cache_ptr, table_ptr, 0, sinks_end,
                                   kv_head, qk_scale, stride_kb, stride_kt, stride_kh, m, l,
                                   acc, HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_PRECISION)
    if HAS_TREE:
        chunk_end = tl.where(split == 0, seq_len, own_end)
        bits = tl.load(tree_bits_ptr + seq)
        m, l, acc = _fold_tree_keys(q, k_cache_ptr, v_cache_ptr, table_ptr, own_end,
                                    chunk_end, bits, kv_head, qk_scale, stride_kb, stride_kt,
                                    stride_kh, m, l, acc, HEAD_DIM, BLOCK_SIZE, BLOCK_D,
                                    BLOCK_N, DOT_PRECISION)
    # An empty split (start >= end) gives output 0 with weight exp2(-inf) == 0.
    out, lse = partial_result(m, l, acc)                                  # [BLOCK_H, BLOCK_D]
    out_offs = seq * stride_os + heads[:, None] * stride_oh + split * stride_osplit + d[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if NUM_SLOTS > 1:
        tl.store(lse_ptr + (seq * num_heads + heads) * NUM_SLOTS + split, lse,
                 mask=rows < GROUP)


@triton.jit
def _prefix_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, first_ptr, members_ptr, work_ptr,
        out_ptr, lse_ptr, qk_scale, num_heads, stride_qs, stride_qh, stride_kb, stride_kt,
        stride_kh, stride_bt, stride_os, stride_oh, stride_osplit,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        FIRST_SLOT: tl.constexpr, NUM_SLOTS: tl.constexpr, PREFIX_SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """One tile of a group's members x one kv head x one split of their shared prefix: every
    query head of the tile's members against the prefix's keys, read once for all of them.
    Rows are (member, head of the kv head's group) pairs; each member's partial output and
    log-sum-exp go to its slot FIRST_SLOT + split, which the reduce merges with its own."""
    work = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    first_member = tl.load(work_ptr + work * 3)
    count = tl.load(work_ptr + work * 3 + 1)
    table_row = tl.load(work_ptr + work * 3 + 2)      # a member: its table holds the prefix
    prefix_len = tl.load(first_ptr + table_row)
    split_len = tl.cdiv(tl.cdiv(prefix_len, PREFIX_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, prefix_len)
    r = tl.arange(0, BLOCK_M)
    member = r // GROUP
    row_ok = member < count                                               # [BLOCK_M]
    seq = tl.load(members_ptr + first_member + member, mask=row_ok, other=0)  # [BLOCK_M]
    heads = kv_head * GROUP + r % GROUP                                   # [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    q_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq[:, None] * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)                                   # [BLOCK_M, BLOCK_D]
    m, l, acc = attend_key_range(q, k_cache_ptr, v_cache_ptr,
                                 block_tables_ptr + table_row * stride_bt, start, end, kv_head,
                                 qk_scale, stride_kb, stride_kt, stride_kh, BLOCK_M, HEAD_DIM,
                                 BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_PRECISION)
    out, lse = partial_result(m, l, acc)                                  # [BLOCK_M, BLOCK_D]
    slot = FIRST_SLOT + split
    tl.store(out_ptr + seq[:, None] * stride_os + heads[:, None] * stride_oh
             + slot * stride_osplit + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_mask)
    tl.store(lse_ptr + (seq * num_heads + heads) * NUM_SLOTS + slot, lse, mask=row_ok)


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
    # A slot with no keys weighs 0 and is not read: with a shared prefix, the prefix slots of
    # a sequence outside every group are never written.
    mask = (lse > float("-inf"))[:, None] & (d < HEAD_DIM)[None, :]
    parts = tl.load(partial_ptr + seq * stride_ps + head * stride_ph
                    + splits[:, None] * stride_psplit + d[None, :], mask=mask, other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d,
             out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@dataclass
class SharedPrefixPlan:
    """A step's shared-prefix groups as the kernels read them, built once per step on the
    host (`shared_prefix_plan`) and used by every layer."""

    first: torch.Tensor      # [num_seqs] int32: tokens of each one's shared prefix (0: none)
    members: torch.Tensor    # [num_members] int32: rows of the batch, group after group
    work: torch.Tensor       # [num_work, 3] int32: a tile's first member, members, table row
    num_work: int
    block_m: int             # rows of a tile: (member, query head) pairs
    max_prefix_len: int
    max_suffix_len: int      # of the tokens after a sequence's prefix (all of a lone one's)


def shared_prefix_plan(groups: Sequence[PrefixGroup], seq_lens: Sequence[int],
                       block_size: int, num_heads: int, num_kv_heads: int,
                       device: torch.device) -> SharedPrefixPlan:
    """The kernels' view of `groups` (taskloom.runtime.shared_prefix) for a decode batch of
    `len(seq_lens)` sequences: each group's members cut into tiles of `block_m // group`."""
    group = num_heads // num_kv_heads
    block_m = max(PREFIX_BLOCK_M, triton.next_power_of_2(group))
    per_tile = block_m // group
    first = [0] * len(seq_lens)
    members: list[int] = []
    work: list[int] = []
    for g in groups:
        for r in g.rows:
            first[r] = g.num_blocks * block_size
        for c in range(0, len(g.rows), per_tile):
            chunk = g.rows[c:c + per_tile]
            work += [len(members), len(chunk), g.rows[0]]
            members.extend(chunk)
    return SharedPrefixPlan(
        to_device(first, torch.int32, device), to_device(members, torch.int32, device),
        to_device(work, torch.int32, device).view(-1, 3), len(work) // 3, block_m,
        max(first), max(n - f for n, f in zip(seq_lens, first)))


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int, num_splits: int | None = None,
                           shared: SharedPrefixPlan | None = None,
                           window: AttentionWindow | None = None,
                           kv_starts: torch.Tensor | None = None,
                           tree: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> torch.Tensor:
    """Attention of one query token per sequence over its whole cached context.

    query: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks] int32;
    seq_lens: [num_seqs] int32 (each at most `max_seq_len`; a sequence of length 0 gets
    zeros). `num_splits` defaults to `decode_num_splits(...)`; a fixed count (CUDA graphs)
    works for any lengths, the splits a short sequence does not reach being empty. With
    `shared`, the members of each group attend to their shared prefix together (its keys
    read once per tile of members, not once per member) and the splits cover what follows
    it; the two are merged by log-sum-exp. With `window`, each query attends to its sliding
    window and the sinks, and no other key is read (the splits cover the window). With
    `kv_starts` ([num_seqs] int32, SnapKV), sequence i reads keys from position kv_starts[i]
    on (the splits cover those; such a sequence is in no shared-prefix group). With `tree`
    (tree_lo [num_seqs] int32, tree_bits [num_seqs] int64: token-tree nodes attended as
    decodes, see AttentionMetadata.decode_tree_lo), sequence i sees the key at
    tree_lo[i] + j only where bit j of tree_bits[i] is set. Returns
    [num_seqs, num_heads, head_dim] in query's dtype.
    """
    check_paged_inputs(query, kv_cache)
    num_seqs, num_heads, head_dim = query.shape
    if tree is not None and (shared is not None or window is not None):
        raise ValueError("token-tree decodes run without shared prefixes or a sliding window")
    if shared is not None:
        if window is not None:
            raise ValueError("shared-prefix attention does not run with a sliding window")
        return _decode_with_shared_prefix(query, kv_cache, block_tables, seq_lens, scale,
                                          shared, kv_starts)
    if num_splits is None:
        attended = max_seq_len if window is None else min(max_seq_len, window.size)
        num_splits = decode_num_splits(num_seqs, kv_cache.shape[3], attended)
    out = torch.empty_like(query)                        # [num_seqs, num_heads, head_dim]
    if num_seqs == 0:
        return out
    if num_splits == 1:
        _launch_split_pass(query, kv_cache, block_tables, seq_lens, scale, out.unsqueeze(2),
                           None, first=kv_starts, window=window, tree=tree)
        return out
    partial = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                          device=query.device)           # [num_seqs, num_heads, splits, d]
    lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                      device=query.device)               # [num_seqs, num_heads, splits]
    _launch_split_pass(query, kv_cache, block_tables, seq_lens, scale, partial, lse,
                       first=kv_starts, window=window, tree=tree)
    _reduce(partial, lse, out)
    return out


def _decode_with_shared_prefix(query: torch.Tensor, kv_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float, shared: SharedPrefixPlan,
                               kv_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Slots 0..S-1 of each sequence: the splits of its own tokens after its prefix (or its
    kv_start); slots S..S+P-1: the splits of its group's prefix (never written, so -inf,
    for a lone one)."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    suffix_splits = decode_num_splits(num_seqs, num_kv_heads, shared.max_suffix_len)
    prefix_splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, max(shared.num_work, 1)
                                           * num_kv_heads), MAX_SPLITS,
                               triton.cdiv(max(shared.max_prefix_len, 1), MIN_SPLIT_TOKENS)))
    slots = suffix_splits + prefix_splits
    partial = torch.empty(num_seqs, num_heads, slots, head_dim, dtype=torch.float32,
                          device=query.device)           # [num_seqs, num_heads, slots, d]
    lse = torch.full((num_seqs, num_heads, slots), float("-inf"), dtype=torch.float32,
                     device=query.device)                # [num_seqs, num_heads, slots]
    out = torch.empty_like(query)                        # [num_seqs, num_heads, head_dim]
    first = shared.first if kv_starts is None else torch.maximum(shared.first, kv_starts)
    _launch_split_pass(query, kv_cache, block_tables, seq_lens, scale, partial, lse,
                       suffix_splits, first)
    if shared.num_work:
        k_cache, v_cache = kv_cache[0], kv_cache[1]      # [num_blocks, block_size, kv_heads, d]
        _prefix_split_kernel[(shared.num_work, num_kv_heads, prefix_splits)](
            query, k_cache, v_cache, block_tables, shared.first, shared.members, shared.work,
            partial, lse, scale * LOG2E, num_heads, query.stride(0), query.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            partial.stride(0), partial.stride(1), partial.stride(2),
            GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
            FIRST_SLOT=suffix_splits, NUM_SLOTS=slots, PREFIX_SPLITS=prefix_splits,
            BLOCK_M=shared.block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_N=DECODE_TILES.keys_per_tile(head_dim),
            DOT_PRECISION=dot_precision(query.dtype), **DECODE_TILES.launch_options())
    _reduce(partial, lse, out)
    return out


def _reduce(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """Merge each (sequence, head)'s slots of `partial` by their log-sum-exp into `out`."""
    num_seqs, num_heads, slots, head_dim = partial.shape
    _decode_reduce_kernel[(num_seqs, num_heads)](
        partial, lse, out, partial.stride(0), partial.stride(1), partial.stride(2),
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, NUM_SPLITS=slots,
        BLOCK_SPLITS=triton.next_power_of_2(slots), BLOCK_D=triton.next_power_of_2(head_dim))


def _launch_split_pass(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, scale: float, partial: torch.Tensor,
                       lse: torch.Tensor | None, num_splits: int | None = None,
                       first: torch.Tensor | None = None,
                       window: AttentionWindow | None = None,
                       tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """First pass into `partial` [num_seqs, num_heads, slots, head_dim] and, with several
    slots, each split's base-2 log-sum-exp into `lse` [num_seqs, num_heads, slots]: the
    context (from `first[i]` on, if given) in `num_splits` splits (default: every slot);
    with `tree` (tree_lo, tree_bits), the chunk of each token-tree node by its bits."""
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    num_splits = num_splits or partial.shape[2]
    k_cache, v_cache = kv_cache[0], kv_cache[1]          # [num_blocks, block_size, kv_heads, d]
    # without a tree, stand-ins that are never read
    tree_lo, tree_bits = tree if tree is not None else (seq_lens, seq_lens)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, first, tree_lo, tree_bits, partial,
        lse, scale * LOG2E,
        num_heads, query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), partial.stride(0), partial.stride(1),
        partial.stride(2), GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits, NUM_SLOTS=partial.shape[2], HAS_FIRST=first is not None,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=DECODE_TILES.keys_per_tile(head_dim),
        WINDOW=0 if window is None else window.size,
        SINKS=0 if window is None else window.num_sink_tokens, HAS_TREE=tree is not None,
        DOT_PRECISION=dot_precision(query.dtype), **DECODE_TILES.launch_options())
