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


def test_decodes_sharing_prefix_blocks_attend_to_them_together() -> None:
    """Decodes whose tables start with the same blocks (two groups, one of a single
    sequence, one decode on its own, a prefill chunk over a shared prefix) match dense
    attention, and the shared-prefix path is the one taken."""
    torch.manual_seed(1)
    heads, kv_heads, dim, bs, num_blocks = 8, 2, 16, 4, 64
    cache = torch.zeros(2, num_blocks, bs, kv_heads, dim)
    perm = torch.randperm(num_blocks).tolist()
    prefixes = {name: [perm.pop() for _ in range(n)] for name, n in (("a", 3), ("b", 2))}
    prefix_kv = {name: (torch.randn(len(t) * bs, kv_heads, dim),
                        torch.randn(len(t) * bs, kv_heads, dim)) for name, t in prefixes.items()}
    for name, table in prefixes.items():
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(len(table) * bs)])
        write_kv_cache(*prefix_kv[name], cache, slots)
    # (shared prefix or None, own tokens after it incl. this step's, new tokens this step)
    seqs = [("a", 1, 1), ("a", 6, 1), ("b", 3, 1), ("a", 9, 1), (None, 7, 1), ("b", 5, 3),
            ("b", 4, 1)]
    tables, qs, full, slots, qsl = [], [], [], [], [0]
    for prefix, own, new in seqs:
        base = prefixes[prefix] if prefix else []
        pk, pv = prefix_kv[prefix] if prefix else (torch.zeros(0, kv_heads, dim),) * 2
        n = len(base) * bs + own
        table = base + [perm.pop() for _ in range(-(-n // bs) - len(base))]
        k = torch.cat([pk, torch.randn(own, kv_heads, dim)])
        v = torch.cat([pv, torch.randn(own, kv_heads, dim)])
        own_slots = [table[p // bs] * bs + p % bs for p in range(len(base) * bs, n)]
        write_kv_cache(k[len(base) * bs:], v[len(base) * bs:], cache, torch.tensor(own_slots))
        tables.append(table)
        qs.append(torch.randn(new, heads, dim))
        full.append((k, v))
        slots += own_slots[-new:]
        qsl.append(qsl[-1] + new)
    width = max(map(len, tables))
    seq_lens = [len(k) for k, _ in full]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor(seq_lens),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, max_query_len=3,
        max_seq_len=max(seq_lens), block_size=bs)
    out = paged_attention_ref(torch.cat(qs), cache, meta, scale=0.3)
    for i, (k, v) in enumerate(full):
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], dense_causal(qs[i], k, v, 0.3),
                                   atol=1e-5, rtol=1e-5)
    shared = meta.ref_plan.shared
    # group a: 3 blocks (the 1-token one keeps its last token, so it still shares all 3);
    # group b: its two decodes share 2 blocks; the chunk and the lone decode attend alone
    assert sorted((len(g.rows), len(g.prefix_slots)) for g in shared) == [(2, 8), (3, 12)]
    assert meta.ref_plan.decode_rows.tolist() == [qsl[4]]


def test_workspace_reuses_a_buffer_and_grows_it() -> None:
    from taskloom.runtime.attention import Workspace
    ws = Workspace()
    a = ws.get("k", (4, 3), torch.float32, torch.device("cpu"))
    b = ws.get("k", (2, 5), torch.float32, torch.device("cpu"))
    assert a.shape == (4, 3) and b.shape == (2, 5)
    assert a.data_ptr() == b.data_ptr()                   # the same memory, not a new tensor
    c = ws.get("k", (5, 5), torch.float32, torch.device("cpu"))   # 25 > 12: grown, doubled
    assert c.shape == (5, 5) and c.data_ptr() != a.data_ptr()
    assert ws.get("k", (24,), torch.float32, torch.device("cpu")).data_ptr() == c.data_ptr()
    other = ws.get("v", (4, 3), torch.float32, torch.device("cpu"))
    assert other.data_ptr() != c.data_ptr()               # one buffer per name
    half = ws.get("k", (4, 3), torch.bfloat16, torch.device("cpu"))
    assert half.dtype == torch.bfloat16
