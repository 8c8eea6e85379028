"""Paged attention: write new K/V into the block cache, then attend over each sequence's context.

The torch reference handles prefill chunks (queries attending to their cached prefix plus
themselves, causally) and decodes in one call over a flat batch. The KV cache of one layer is
a tensor `[2, num_blocks, block_size, num_kv_heads, head_dim]`.

Decodes whose block tables start with the same blocks (a shared system prompt or few-shot
prefix found in the prefix cache, the n samples of one prompt) attend to that shared prefix
together, as Hydragen does: its keys and values are gathered once and all the group's queries
are multiplied against them in one matmul; each sequence then attends to its own suffix, and
the two partial softmaxes are merged by their log-sum-exp. A step of 64 decodes sharing a
2,000-token prompt reads the prompt's KV once per layer instead of 64 times.

Under a sliding window (`AttentionMetadata.window`: KV compression, or a Mistral's own) each
query sees the keys within its window and the attention sinks; only those positions are
gathered, since the blocks before a sequence's window may be back in the pool (their table
entries are then NULL_BLOCK). No prefix is shared whole under a window, so the groups are off.

A sequence whose prompt SnapKV compressed (`AttentionMetadata.kv_starts`) reads its context
from its kv_start on only, and is attended alone, never in a group.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taskloom.config import AttentionWindow
from taskloom.runtime.attention import AttentionMetadata, Workspace
from taskloom.runtime.shared_prefix import shared_prefix_groups


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store each token's key and value at its slot (block_id * block_size + offset)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key)      # key: [num_tokens, num_kv_heads, head_dim]
    flat[1].index_copy_(0, slot_mapping, value)


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one sequence's first `seq_len` tokens, in order."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]  # [seq_len, num_kv_heads, head_dim]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


def gather_positions(kv_cache: torch.Tensor, block_table: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [n, num_kv_heads, head_dim] of one sequence at `positions` [n]."""
    bs = kv_cache.shape[2]
    slots = block_table[positions // bs].long() * bs + positions % bs   # [n]
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
    return flat[0, slots], flat[1, slots]


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float,
                        decode: DecodeFn | None = None) -> torch.Tensor:
    """Causal attention of every query token over its sequence's cached context.

    query: [num_tokens, num_heads, head_dim]; returns the same shape. Keys and values of this
    step's tokens must already be in the cache (see `write_kv_cache`). Single-token queries
    (decodes) are attended in one padded batch (by `decode`, `decode_batch` if not given);
    longer queries (prefill chunks) one by one.
    """
    plan = meta.ref_plan
    if plan is None:
        plan = meta.ref_plan = _plan(meta, query.device, query.dtype)
    out = torch.empty_like(query)
    if plan.decode_rows is not None:
        (decode or decode_batch)(query, kv_cache, plan, scale, out)
    for group in plan.shared:
        _decode_shared_prefix(query, kv_cache, group, scale, out)
    qsl = meta.query_start_loc_cpu
    starts = meta.kv_starts_cpu
    for i in plan.prefill_seqs:
        out[qsl[i]:qsl[i + 1]] = _attend_one(query[qsl[i]:qsl[i + 1]], kv_cache,
                                             meta.block_tables[i], meta.seq_lens_cpu[i], scale,
                                             meta.window, starts[i] if starts else 0,
                                             _chunk_tree_mask(meta, i))
    return out


def _chunk_tree_mask(meta: AttentionMetadata, i: int) -> torch.Tensor | None:
    """Sequence i's tree mask [q_len, q_len] over its chunk, None if it attends causally."""
    starts = meta.tree_starts_cpu
    if starts is None or starts[i] < 0:
        return None
    assert meta.tree_mask is not None
    q_len = meta.query_start_loc_cpu[i + 1] - meta.query_start_loc_cpu[i]
    return meta.tree_mask[starts[i]:starts[i] + q_len * q_len].view(q_len, q_len)


@dataclass
class _SharedPrefix:
    """Decodes whose contexts start with the same cache blocks."""

    rows: torch.Tensor          # [g] rows of the flat batch holding their queries
    prefix_slots: torch.Tensor  # [p] cache slots of the shared prefix
    suffix_slots: torch.Tensor  # [g, max_suffix] cache slots of each one's own positions
    suffix_mask: torch.Tensor   # [g, 1, 1, max_suffix] additive: 0 or -inf past the end


@dataclass
class RefPlan:
    """What the reference path derives from the metadata once per step, for every layer."""

    prefill_seqs: list[int]
    decode_rows: torch.Tensor | None    # [b] rows of the flat batch holding decode queries
    decode_slots: torch.Tensor | None   # [b, max_len] cache slot of each context position
    decode_mask: torch.Tensor | None    # [b, 1, 1, max_len] additive: 0 or -inf past the end
    shared: list[_SharedPrefix]         # decodes attending to a shared prefix together
    workspace: Workspace | None = None  # buffers for the decode batch's gathered keys
    # [b] int64: how many of each decode's slots it sees, all of them (None where the mask
    # hides more than the padding: token-tree nodes)
    decode_lens: torch.Tensor | None = None


# (query, kv_cache, plan, scale, out): attends the plan's decode rows into `out`
DecodeFn = Callable[[torch.Tensor, torch.Tensor, RefPlan, float, torch.Tensor], None]


def _plan(meta: AttentionMetadata, device: torch.device, dtype: torch.dtype) -> RefPlan:
    qsl = meta.query_start_loc_cpu
    decodes = [i for i in range(meta.num_seqs) if qsl[i + 1] - qsl[i] == 1]
    prefills = [i for i in range(meta.num_seqs) if qsl[i + 1] - qsl[i] != 1]
    groups = meta.shared_prefix_groups
    if meta.decode_tree_lo_cpu is not None:     # tree nodes see only part of their chunk
        groups = []
    if groups is None:      # a window's masks differ per query: no prefix is shared whole
        starts = meta.kv_starts_cpu
        whole = [i for i in decodes if not starts[i]] if starts else decodes
        groups = (shared_prefix_groups(meta.block_tables.cpu().numpy(), meta.seq_lens_cpu,
                                       whole, meta.block_size)
                  if len(whole) > 1 and meta.window is None else [])
    grouped = {i for g in groups for i in g.rows}
    alone = [i for i in decodes if i not in grouped]
    shared = [_shared_plan(meta, list(g.rows), g.num_blocks, device, dtype) for g in groups]
    if not alone:
        return RefPlan(prefills, None, None, None, shared)
    rows, slots, mask, lens = _context_slots(meta, alone, *_window_ranges(meta, alone), device,
                                             dtype)
    if meta.decode_tree_lo_cpu is not None:
        _mask_tree_decodes(meta, alone, mask)
        lens = None
    return RefPlan(prefills, rows, slots, mask, shared, meta.workspace, lens)


def _mask_tree_decodes(meta: AttentionMetadata, seqs: list[int], mask: torch.Tensor) -> None:
    """Hide from each token-tree node attended as a decode the nodes of its chunk that are
    not its ancestors (meta.decode_tree_lo / _bits), in the additive mask [b, 1, 1, max_len]
    of `_context_slots` (the decodes `seqs`, no window, each from position 0)."""
    assert meta.decode_tree_lo_cpu is not None and meta.decode_tree_bits_cpu is not None
    lo = torch.tensor([meta.decode_tree_lo_cpu[i] for i in seqs], device=mask.device)[:, None]
    bits = torch.tensor([meta.decode_tree_bits_cpu[i] for i in seqs], device=mask.device)
    j = torch.arange(mask.shape[-1], device=mask.device)[None, :]       # [1, max_len]
    off = (j - lo).clamp(0, 62)                                         # [b, max_len]
    hidden = (j >= lo) & ((bits[:, None] >> off) & 1 == 0)              # [b, max_len]
    mask.masked_fill_(hidden[:, None, None, :], float("-inf"))


def _context_slots(meta: AttentionMetadata, seqs: list[int], heads: list[int],
                   starts: list[int], device: torch.device, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For decodes `seqs`, each attending to positions 0 .. heads[i] - 1 and then to its
    context from position `starts[i]` on: their rows, the cache slots of those positions
    [b, max_len], the additive padding mask and how many positions each sees [b]."""
    bs = meta.block_size
    lens = [h + meta.seq_lens_cpu[i] - s for i, h, s in zip(seqs, heads, starts)]
    max_len = max(lens)
    idx = torch.tensor(seqs, device=device)
    tables = meta.block_tables[idx, :-(-max(meta.seq_lens_cpu[i] for i in seqs) // bs)].long()
    j = torch.arange(max_len, device=device)[None, :]                  # [1, max_len]
    heads_t = torch.tensor(heads, device=device)[:, None]              # [b, 1]
    positions = torch.where(j < heads_t, j, torch.tensor(starts, device=device)[:, None]
                            + j - heads_t)                             # [b, max_len]
    lens_t = torch.tensor(lens, device=device)                         # [b]
    valid = j < lens_t[:, None]                                        # [b, max_len]
    positions = torch.where(valid, positions, 0)
    slots = tables.gather(1, positions // bs) * bs + positions % bs    # [b, max_len]
    slots = torch.where(valid, slots, 0)    # padding reads slot 0, not a released block
    mask = torch.zeros(valid.shape, dtype=dtype, device=device)
    mask.masked_fill_(~valid, float("-inf"))
    rows = torch.tensor([meta.query_start_loc_cpu[i] for i in seqs], device=device)
    return rows, slots, mask[:, None, None, :], lens_t


def _window_ranges(meta: AttentionMetadata, seqs: list[int]) -> tuple[list[int], list[int]]:
    """Of each decode in `seqs`: how many sink positions it sees before its window, and
    where its window starts (no window: 0 sinks, from its kv_start)."""
    w = meta.window
    if w is None:
        starts = meta.kv_starts_cpu
        return [0] * len(seqs), [starts[i] for i in seqs] if starts else [0] * len(seqs)
    starts = [w.first_visible(meta.seq_lens_cpu[i] - 1) for i in seqs]
    return [min(w.num_sink_tokens, s) for s in starts], starts


def _shared_plan(meta: AttentionMetadata, seqs: list[int], num_blocks: int,
                 device: torch.device, dtype: torch.dtype) -> _SharedPrefix:
    if meta.window is not None:
        raise ValueError("shared-prefix attention does not run with a sliding window")
    bs = meta.block_size
    first = meta.block_tables[seqs[0], :num_blocks].long()             # [p / bs]
    prefix = (first[:, None] * bs + torch.arange(bs, device=device)).flatten()  # [p]
    rows, slots, mask, _ = _context_slots(meta, seqs, [0] * len(seqs),
                                          [num_blocks * bs] * len(seqs), device, dtype)
    return _SharedPrefix(rows, prefix, slots, mask)


def _attend_one(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                seq_len: int, scale: float, window: AttentionWindow | None = None,
                kv_start: int = 0, tree: torch.Tensor | None = None) -> torch.Tensor:
    """One sequence's queries (the last q_len positions of its context), causal.

    The inputs are 4-D (a batch of one): on the CPU only 4-D inputs reach PyTorch's flash
    attention kernel, 3-D ones its math path, which materialises the scores and was 5x slower
    for a 2,048-token chunk. A chunk with no cached prefix needs no mask: `is_causal` is
    exactly its mask, and the kernel then skips the blocks above the diagonal. From
    `kv_start` on only, where given (SnapKV). With `tree` ([q_len, q_len] bool, a token
    tree's mask), the chunk's keys are seen by it and the context before them by all."""
    q_len = q.shape[0]                                     # q: [q_len, num_heads, head_dim]
    if window is not None:
        return _attend_one_windowed(q, kv_cache, block_table, seq_len, scale, window)
    if kv_start:
        return _attend_one_from(q, kv_cache, block_table, seq_len, scale, kv_start)
    k, v = gather_context(kv_cache, block_table, seq_len)  # [seq_len, num_kv_heads, head_dim]
    mask = None
    if tree is not None:
        context = tree.new_ones((q_len, seq_len - q_len))
        mask = torch.cat([context, tree], dim=1)           # [q_len, seq_len]
    elif q_len != seq_len:
        # Query j sits at position seq_len - q_len + j and sees keys 0 .. that position.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(seq_len, device=q.device)[None, :]
    return _sdpa(q, k, v, mask, scale)


def _attend_one_windowed(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         seq_len: int, scale: float, window: AttentionWindow) -> torch.Tensor:
    """`_attend_one` within a sliding window: only the sink positions before the first
    query's window and the positions from that window on are read (those before may sit in
    blocks given back to the pool), then each query is masked to its own window."""
    q_len = q.shape[0]
    first = window.first_visible(seq_len - q_len)
    sinks = min(window.num_sink_tokens, first)
    dev = q.device
    k_pos = torch.cat([torch.arange(sinks, device=dev),
                       torch.arange(first, seq_len, device=dev)])       # [n]
    k, v = gather_positions(kv_cache, block_table, k_pos)  # [n, num_kv_heads, head_dim]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=dev)[:, None]  # [q_len, 1]
    mask = (k_pos[None, :] <= q_pos) & ((k_pos[None, :] < window.num_sink_tokens)
                                        | (k_pos[None, :] > q_pos - window.size))
    return _sdpa(q, k, v, mask, scale)


def _attend_one_from(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_len: int, scale: float, kv_start: int) -> torch.Tensor:
    """`_attend_one` over the cache slots of positions `kv_start .. seq_len - 1` (a
    compressed prompt's kept entries, then what followed), causal by slot."""
    q_len = q.shape[0]
    dev = q.device
    k_pos = torch.arange(kv_start, seq_len, device=dev)                 # [n]
    k, v = gather_positions(kv_cache, block_table, k_pos)  # [n, num_kv_heads, head_dim]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=dev)[:, None]  # [q_len, 1]
    return _sdpa(q, k, v, k_pos[None, :] <= q_pos, scale)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """q [q_len, heads, d] against k, v [n, kv_heads, d] (mask [q_len, n] bool, or None:
    causal); returns [q_len, heads, d]."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1])               # [1, num_heads, q_len, head_dim]
    return o[0].transpose(0, 1)


def decode_batch(query: torch.Tensor, kv_cache: torch.Tensor, plan: RefPlan, scale: float,
                 out: torch.Tensor) -> None:
    """Attend the single-token queries of the plan's decode rows in one padded batch."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    b, max_len = plan.decode_slots.shape
    slots = plan.decode_slots.flatten()
    shape = (2, b * max_len, num_kv_heads, head_dim)
    ws = plan.workspace
    # keys and values in one gather; into a buffer written before, if the runner keeps one
    # (a fresh one page-faults on the CPU, see Workspace)
    kv = torch.index_select(flat, 1, slots, out=None if ws is None else
                            ws.get("decode_kv", shape, flat.dtype, flat.device))
    kv = kv.view(2, b, max_len, num_kv_heads, head_dim)
    every_row = plan.decode_rows.shape[0] == query.shape[0]   # a decode-only step: in order
    q = (query if every_row else query[plan.decode_rows]).unsqueeze(2)  # [b, heads, 1, d]
    o = F.scaled_dot_product_attention(
        q, kv[0].transpose(1, 2), kv[1].transpose(1, 2), attn_mask=plan.decode_mask,
        scale=scale, enable_gqa=num_kv_heads != q.shape[1])  # [b, num_heads, 1, head_dim]
    if every_row:
        out.copy_(o.squeeze(2))
    else:
        out[plan.decode_rows] = o.squeeze(2)


def _decode_shared_prefix(query: torch.Tensor, kv_cache: torch.Tensor, group: _SharedPrefix,
                          scale: float, out: torch.Tensor) -> None:
    """Attend a group's decode queries to their shared prefix in one matmul and to their own
    suffixes in a padded batch, and merge the two partial softmaxes (in float32)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    q = query[group.rows].float()                          # [g, num_heads, head_dim]
    g, num_heads, _ = q.shape
    per_kv = num_heads // num_kv_heads
    # Prefix: every query of the group against the same keys, [kv_heads, g * per_kv, p].
    kp = flat[0].index_select(0, group.prefix_slots).float().transpose(0, 1)  # [kvh, p, d]
    vp = flat[1].index_select(0, group.prefix_slots).float().transpose(0, 1)
    qp = q.view(g, num_kv_heads, per_kv, head_dim).permute(1, 0, 2, 3).reshape(
        num_kv_heads, g * per_kv, head_dim)                # [kvh, g * per_kv, d]
    o1, lse1 = _softmax_attend(qp @ kp.transpose(1, 2) * scale, vp)
    o1 = o1.view(num_kv_heads, g, per_kv, head_dim).permute(1, 0, 2, 3).reshape(
        g, num_heads, head_dim)
    lse1 = lse1.view(num_kv_heads, g, per_kv).permute(1, 0, 2).reshape(g, num_heads)
    # Suffix: each query against its own positions, [g, kv_heads, per_kv, s].
    b, s = group.suffix_slots.shape
    slots = group.suffix_slots.flatten()
    ks = flat[0].index_select(0, slots).view(b, s, num_kv_heads, head_dim).float()
    vs = flat[1].index_select(0, slots).view(b, s, num_kv_heads, head_dim).float()
    qs = q.view(g, num_kv_heads, per_kv, head_dim)
    scores = qs @ ks.permute(0, 2, 3, 1) * scale + group.suffix_mask.float()  # [g, kvh, pk, s]
    o2, lse2 = _softmax_attend(scores, vs.transpose(1, 2))
    o2, lse2 = o2.reshape(g, num_heads, head_dim), lse2.reshape(g, num_heads)
    lse = torch.logaddexp(lse1, lse2)                      # [g, num_heads]
    merged = (o1 * (lse1 - lse).exp()[..., None] + o2 * (lse2 - lse).exp()[..., None])
    out[group.rows] = merged.to(out.dtype)


def _softmax_attend(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [..., q, k], v [..., k, d] -> (softmax(scores) @ v [..., q, d], logsumexp of the
    scores [..., q])."""
    lse = torch.logsumexp(scores, dim=-1)                  # [..., q]
    return (scores - lse[..., None]).exp() @ v, lse
