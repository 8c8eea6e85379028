"""Paged attention: write new K/V into the block cache, then attend over each sequence's context.

The torch reference handles prefill chunks (queries attending to their cached prefix plus
themselves, causally) and decodes in one call over a flat batch. The KV cache of one layer is
a tensor `[2, num_blocks, block_size, num_kv_heads, head_dim]`.
"""
from __future__ import annotations

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
    out = torch.empty_like(query)
    qsl = meta.query_start_loc_cpu
    decodes = [i for i in range(meta.num_seqs) if qsl[i + 1] - qsl[i] == 1]
    if decodes:
        _decode_batch(query, kv_cache, meta, scale, decodes, out)
    if len(decodes) < meta.num_seqs:
        for i in sorted(set(range(meta.num_seqs)) - set(decodes)):
            out[qsl[i]:qsl[i + 1]] = _attend_one(query[qsl[i]:qsl[i + 1]], kv_cache,
                                                 meta.block_tables[i], meta.seq_lens_cpu[i],
                                                 scale)
    return out


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


def _decode_batch(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, seqs: list[int], out: torch.Tensor) -> None:
    """Attend the single-token queries of `seqs` in one padded batch."""
    block_size = kv_cache.shape[2]
    rows = torch.tensor([meta.query_start_loc_cpu[i] for i in seqs], device=query.device)
    lens = [meta.seq_lens_cpu[i] for i in seqs]
    max_blocks = -(-max(lens) // block_size)
    idx = torch.tensor(seqs, device=query.device)
    tables = meta.block_tables[idx, :max_blocks].long()    # [b, max_blocks]
    k = kv_cache[0][tables].flatten(1, 2)                  # [b, max_len, num_kv_heads, head_dim]
    v = kv_cache[1][tables].flatten(1, 2)
    lens_t = torch.tensor(lens, device=query.device)
    mask = torch.arange(k.shape[1], device=query.device)[None, :] < lens_t[:, None]
    q = query[rows].unsqueeze(2)                           # [b, num_heads, 1, head_dim]
    o = F.scaled_dot_product_attention(
        q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
        scale=scale, enable_gqa=k.shape[2] != q.shape[1])  # [b, num_heads, 1, head_dim]
    out[rows] = o.squeeze(2)
