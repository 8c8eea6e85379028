"""Test helper: paged batches under a sliding window, with the blocks no query may read
poisoned, and the dense attention they must equal.

A block whose positions all lie before every query's window and after the sinks may be back
in the pool (the KV manager gives such blocks back), so its contents are overwritten with NaN
here, and the block tables name it NULL_BLOCK (-1): an implementation that read one would
return NaN or fail.
"""
from __future__ import annotations

import dataclasses

import torch

from taskloom.config import AttentionWindow
from taskloom.engine.kv_cache import NULL_BLOCK
from taskloom.runtime.attention import AttentionMetadata
from tests.models.single_seq import make_metadata

BLOCK_SIZE = 16


def windowed_batch(seqs: list[tuple[int, int]], window: AttentionWindow, num_heads: int,
                   num_kv_heads: int, head_dim: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata,
                              AttentionMetadata]:
    """(query, poisoned cache, clean cache, metadata, clean metadata) in float32 on the CPU
    for sequences of (tokens cached, new tokens). The metadata's block tables name the
    released blocks NULL_BLOCK, as the KV manager's do; the clean metadata's still name them
    (the dense reference reads them)."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-(c + n) // BLOCK_SIZE) for c, n in seqs]
    num_blocks = sum(counts) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(count)] for count in counts]
    clean = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(sum(n for _, n in seqs), num_heads, head_dim, generator=gen)
    meta, _ = make_metadata(tables, [c for c, _ in seqs], [n for _, n in seqs], BLOCK_SIZE,
                            torch.device("cpu"))
    meta.window = window
    poisoned = clean.clone()
    released = meta.block_tables.clone()
    for i, (table, (cached, _)) in enumerate(zip(tables, seqs)):
        first = window.first_visible(cached)        # the window of the step's first query
        sink_blocks = -(-window.num_sink_tokens // BLOCK_SIZE)
        for j in range(sink_blocks, (first // BLOCK_SIZE)):
            poisoned[:, table[j]] = float("nan")
            released[i, j] = NULL_BLOCK
    clean_meta = dataclasses.replace(meta)
    meta.block_tables = released
    return query, poisoned, clean, meta, clean_meta


def dense_windowed(query: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float) -> torch.Tensor:
    """Each query against its sequence's whole context, masked to its window and the sinks,
    in float64."""
    w = meta.window
    assert w is not None
    out = torch.empty(query.shape, dtype=torch.float64)
    qsl, bs = meta.query_start_loc_cpu, meta.block_size
    group = query.shape[1] // cache.shape[3]
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        blocks = meta.block_tables[i, :-(-seq_len // bs)].long()
        k = cache[0, blocks].flatten(0, 1)[:seq_len].double().repeat_interleave(group, 1)
        v = cache[1, blocks].flatten(0, 1)[:seq_len].double().repeat_interleave(group, 1)
        q = query[qsl[i]:qsl[i + 1]].double()                     # [q_len, heads, d]
        q_pos = torch.arange(seq_len - q.shape[0], seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        visible = (k_pos <= q_pos) & ((k_pos > q_pos - w.size) | (k_pos < w.num_sink_tokens))
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        out[qsl[i]:qsl[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
