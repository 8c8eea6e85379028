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
    step's tokens must already be in the cache (see `write_kv_cache`).
    """
    num_heads = query.shape[1]
    num_kv_heads = kv_cache.shape[3]
    out = torch.empty_like(query)
    qsl = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        q = query[qsl[i]:qsl[i + 1]]                       # [q_len, num_heads, head_dim]
        q_len = q.shape[0]
        k, v = gather_context(kv_cache, meta.block_tables[i], seq_len)
        if num_kv_heads != num_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        # Query j sits at position seq_len - q_len + j and sees keys 0 .. that position.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        mask = q_pos[:, None] >= torch.arange(seq_len, device=query.device)[None, :]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale)                   # [num_heads, q_len, head_dim]
        out[qsl[i]:qsl[i + 1]] = o.transpose(0, 1)
    return out
