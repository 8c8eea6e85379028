"""Paged attention on the GPU: one entry with the signature of `paged_attention_ref`.

Decode-only batches (one query token per sequence) go to the flash-decoding kernel, anything
else (prefill chunks, or a mix of chunks and decodes) to the extend kernel. The choice and the
grids use only the metadata's host copies, so no call syncs with the device, and a decode
batch can be captured in a CUDA graph: with `meta.decode_num_splits` set, the decode grid is
fixed and each sequence's share of the splits is computed on the device. Eager decode steps
whose metadata names groups of decodes sharing a cached prefix attend to each prefix once per
tile of its group (see `decode_attention`).
"""
from __future__ import annotations

import torch

from taskloom.ops.triton.decode_attention import (
    SharedPrefixPlan,
    paged_decode_attention,
    shared_prefix_plan,
)
from taskloom.ops.triton.extend_attention import paged_extend_attention
from taskloom.runtime.attention import AttentionMetadata


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Causal attention of every query token over its sequence's cached context.

    query: [num_tokens, num_heads, head_dim]; returns the same shape. Keys and values of this
    step's tokens must already be in the cache (see `write_kv_cache`). With `meta.window`,
    within each query's sliding window and the sinks; with `meta.kv_starts` (SnapKV), from
    each sequence's kv_start on; with `meta.tree_mask`, token trees' chunks by their masks
    (with `meta.decode_tree_lo`, their nodes attended as decodes, by their bits).
    """
    if meta.max_query_len == 1 and query.shape[0] == meta.num_seqs:
        tree = (None if meta.decode_tree_lo is None or meta.decode_tree_bits is None
                else (meta.decode_tree_lo, meta.decode_tree_bits))
        return paged_decode_attention(query, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                      meta.max_seq_len, meta.decode_num_splits,
                                      None if tree else _shared_prefix(meta, query, kv_cache),
                                      meta.window, meta.kv_starts, tree)
    return paged_extend_attention(query, kv_cache, meta.query_start_loc, meta.seq_lens,
                                  meta.block_tables, scale, meta.max_query_len, meta.window,
                                  meta.kv_starts, meta.tree_mask, meta.tree_starts)


def _shared_prefix(meta: AttentionMetadata, query: torch.Tensor,
                   kv_cache: torch.Tensor) -> SharedPrefixPlan | None:
    """The kernels' plan of the step's shared-prefix groups (`meta.shared_prefix_groups`,
    which the runner sets for eager decode steps), built by the first layer; None without."""
    if not meta.shared_prefix_groups:
        return None
    if meta.kernel_plan is None:
        meta.kernel_plan = shared_prefix_plan(meta.shared_prefix_groups, meta.seq_lens_cpu,
                                              meta.block_size, query.shape[1],
                                              kv_cache.shape[3], query.device)
    return meta.kernel_plan
