"""Paged attention: write new K/V into the block cache, then attend over each sequence's context.

The torch reference handles prefill chunks (queries attending to their cached prefix plus
themselves, causally) and decodes in one call over a flat batch. The KV cache of one layer is
a tensor `[2, num_blocks, block_size, num_kv_heads, head_dim]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taskloom.runtime.attention import AttentionMetadata


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


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of every query token over its sequence's cached context.

    query: [num_tokens, num_heads, head_dim]; returns the same shape. Keys and values of this
    step's tokens must already be in the cache (see `write_kv_cache`). Single-token queries
    (decodes) are attended in one padded batch; longer queries (prefill chunks) one by one.
    """
    plan = meta.ref_plan
    if plan is None:
        plan = meta.ref_plan = _plan(meta, query.device, query.dtype)
    out = torch.empty_like(query)
    if plan.decode_rows is not None:
        _decode_batch(query, kv_cache, plan, scale, out)
    qsl = meta.query_start_loc_cpu
    for i in plan.prefill_seqs:
        out[qsl[i]:qsl[i + 1]] = _attend_one(query[qsl[i]:qsl[i + 1]], kv_cache,
                                             meta.block_tables[i], meta.seq_lens_cpu[i], scale)
    return out


@dataclass
class _RefPlan:
    """What the reference path derives from the metadata once per step, for every layer."""

    prefill_seqs: list[int]
    decode_rows: torch.Tensor | None    # [b] rows of the flat batch holding decode queries
    decode_slots: torch.Tensor | None   # [b, max_len] cache slot of each context position
    decode_mask: torch.Tensor | None    # [b, 1, 1, max_len] additive: 0 or -inf past the end


def _plan(meta: AttentionMetadata, device: torch.device, dtype: torch.dtype) -> _RefPlan:
    qsl = meta.query_start_loc_cpu
    decodes = [i for i in range(meta.num_seqs) if qsl[i + 1] - qsl[i] == 1]
    prefills = [i for i in range(meta.num_seqs) if qsl[i + 1] - qsl[i] != 1]
    if not decodes:
        return _RefPlan(prefills, None, None, None)
    bs = meta.block_size
    lens = [meta.seq_lens_cpu[i] for i in decodes]
    max_len = max(lens)
    idx = torch.tensor(decodes, device=device)
    tables = meta.block_tables[idx, :-(-max_len // bs)].long()       # [b, max_blocks]
    offsets = torch.arange(bs, device=device)
    slots = (tables[:, :, None] * bs + offsets).flatten(1)[:, :max_len]  # [b, max_len]
    lens_t = torch.tensor(lens, device=device)
    valid = torch.arange(max_len, device=device)[None, :] < lens_t[:, None]  # [b, max_len]
    mask = torch.zeros(valid.shape, dtype=dtype, device=device)
    mask.masked_fill_(~valid, float("-inf"))
    rows = torch.tensor([qsl[i] for i in decodes], device=device)
    return _RefPlan(prefills, rows, slots, mask[:, None, None, :])


def _attend_one(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                seq_len: int, scale: float) -> torch.Tensor:
    """One sequence's queries (the last q_len positions of its context), causal."""
    q_len = q.shape[0]                                     # q: [q_len, num_heads, head_dim]
    k, v = gather_context(kv_cache, block_table, seq_len)  # [seq_len, num_kv_heads, head_dim]
    # Query j sits at position seq_len - q_len + j and sees keys 0 .. that position.
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    mask = q_pos[:, None] >= torch.arange(seq_len, device=q.device)[None, :]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1])               # [num_heads, q_len, head_dim]
    return o.transpose(0, 1)


def _decode_batch(query: torch.Tensor, kv_cache: torch.Tensor, plan: _RefPlan, scale: float,
                  out: torch.Tensor) -> None:
    """Attend the single-token queries of the plan's decode rows in one padded batch."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    b, max_len = plan.decode_slots.shape
    slots = plan.decode_slots.flatten()
    k = flat[0].index_select(0, slots).view(b, max_len, num_kv_heads, head_dim)
    v = flat[1].index_select(0, slots).view(b, max_len, num_kv_heads, head_dim)
    q = query[plan.decode_rows].unsqueeze(2)               # [b, num_heads, 1, head_dim]
    o = F.scaled_dot_product_attention(
        q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.decode_mask,
        scale=scale, enable_gqa=num_kv_heads != q.shape[1])  # [b, num_heads, 1, head_dim]
    out[plan.decode_rows] = o.squeeze(2)
