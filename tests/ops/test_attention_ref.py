"""The paged-attention reference against plain dense causal attention, on a mixed batch of
prefill chunks (attending to a cached prefix) and decodes, with scattered block tables."""
from __future__ import annotations

import torch

from taskloom.ops.attention import paged_attention_ref, write_kv_cache
from taskloom.runtime.attention import AttentionMetadata


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [q_len, H, D] at the last q_len positions of k/v: [L, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    L, q_len = k.shape[0], q.shape[0]
    pos = torch.arange(L - q_len, L)[:, None]
    scores = scores.masked_fill(torch.arange(L)[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_mixed_prefill_chunks_and_decodes_match_dense() -> None:
    torch.manual_seed(0)
    heads, kv_heads, dim, bs, num_blocks = 6, 2, 16, 4, 40
    cache = torch.zeros(2, num_blocks, bs, kv_heads, dim)
    # (context already cached, new tokens this step): decodes, a chunk over a prefix, a prompt
    seqs = [(9, 1), (0, 7), (5, 6), (12, 1), (1, 1)]
    perm = torch.randperm(num_blocks).tolist()
    tables, slots, qs, ks, vs, full = [], [], [], [], [], []
    for cached, new in seqs:
        n = cached + new
        table = [perm.pop() for _ in range(-(-n // bs))]
        tables.append(table)
        k, v = torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
        old = [table[p // bs] * bs + p % bs for p in range(cached)]
        write_kv_cache(k[:cached], v[:cached], cache, torch.tensor(old, dtype=torch.int64))
        slots += [table[p // bs] * bs + p % bs for p in range(cached, n)]
        qs.append(torch.randn(new, heads, dim))
        ks.append(k[cached:])
        vs.append(v[cached:])
        full.append((k, v))
    width = max(map(len, tables))
    qsl = [0]
    for _, new in seqs:
        qsl.append(qsl[-1] + new)
    seq_lens = [c + n for c, n in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor(seq_lens),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, max_query_len=7,
        max_seq_len=max(seq_lens), block_size=bs)
    write_kv_cache(torch.cat(ks), torch.cat(vs), cache, meta.slot_mapping)
    out = paged_attention_ref(torch.cat(qs), cache, meta, scale=0.25)
    for i, (k, v) in enumerate(full):
        expected = dense_causal(qs[i], k, v, 0.25)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], expected, atol=1e-5, rtol=1e-5)
