"""Attention from each sequence's kv_start (SnapKV: a compressed prompt's kept entries sit at
positions kv_start .. L - 1 of its table, and nothing before them is its KV): the torch
reference and the Triton kernels (through the interpreter on the CPU, compiled on a GPU)
against dense attention over those positions. The blocks before a sequence's kv_start are
NULL_BLOCK in its table and the slots before it in its first block hold NaN, so an
implementation that read one would fail."""
from __future__ import annotations

import pytest
import torch

from taskloom.engine.kv_cache import NULL_BLOCK
from taskloom.ops.attention import paged_attention_ref
from taskloom.runtime.attention import AttentionMetadata
from taskloom.runtime.shared_prefix import PrefixGroup
from tests.models.single_seq import make_metadata

BLOCK_SIZE = 16
# (tokens cached, new tokens, kv_start): decodes and verification chunks of compressed
# prompts, next to sequences that hold their whole context (kv_start 0)
DECODES = [(0, 1, 0), (100, 1, 37), (64, 1, 48), (299, 1, 200), (20, 1, 0), (40, 1, 39)]
CHUNKS = [(90, 4, 22), (0, 50, 0), (200, 1, 150), (70, 9, 64), (33, 3, 0)]
# decodes of which rows 0 and 1 share their first two blocks (see `share`)
SHARED = [(40, 1, 0), (40, 1, 0), (100, 1, 37), (20, 1, 0)]


def share(meta: AttentionMetadata) -> None:
    meta.block_tables[1, :2] = meta.block_tables[0, :2]


def compressed_batch(seqs: list[tuple[int, int, int]], num_heads: int, num_kv_heads: int,
                     head_dim: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(query, poisoned cache, clean cache, metadata with kv_starts) in float32. Block 0,
    which padding reads (masked), is in no table: its slots stay finite."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-(c + n) // BLOCK_SIZE) for c, n, _ in seqs]
    num_blocks = sum(counts) + 2
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = [[perm.pop() for _ in range(count)] for count in counts]
    clean = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(sum(n for _, n, _ in seqs), num_heads, head_dim, generator=gen)
    poisoned = clean.clone()
    for table, (_, _, start) in zip(tables, seqs):
        for j in range(start // BLOCK_SIZE):
            poisoned[:, table[j]] = float("nan")
            table[j] = NULL_BLOCK
        if start % BLOCK_SIZE:
            poisoned[:, table[start // BLOCK_SIZE], :start % BLOCK_SIZE] = float("nan")
    meta, _ = make_metadata(tables, [c for c, _, _ in seqs], [n for _, n, _ in seqs],
                            BLOCK_SIZE, torch.device("cpu"))
    starts = [s for _, _, s in seqs]
    meta.kv_starts = torch.tensor(starts, dtype=torch.int32)
    meta.kv_starts_cpu = starts
    return query, poisoned, clean, meta


def dense_from_starts(query: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """Each query against positions kv_start .. itself of its sequence, in float64."""
    assert meta.kv_starts_cpu is not None
    out = torch.empty(query.shape, dtype=torch.float64)
    qsl, bs = meta.query_start_loc_cpu, meta.block_size
    group = query.shape[1] // cache.shape[3]
    flat = cache.view(2, -1, *cache.shape[3:])
    for i, (seq_len, start) in enumerate(zip(meta.seq_lens_cpu, meta.kv_starts_cpu)):
        pos = torch.arange(start, seq_len)
        slots = meta.block_tables[i, pos // bs].long() * bs + pos % bs
        k = flat[0, slots].double().repeat_interleave(group, 1)    # [n, heads, d]
        v = flat[1, slots].double().repeat_interleave(group, 1)
        q = query[qsl[i]:qsl[i + 1]].double()
        q_pos = torch.arange(seq_len - q.shape[0], seq_len)[:, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(pos[None, :] > q_pos, float("-inf"))
        out[qsl[i]:qsl[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("seqs", [DECODES, CHUNKS], ids=["decodes", "chunks"])
def test_reference_attends_from_each_kv_start_and_reads_nothing_before(
        seqs: list[tuple[int, int, int]]) -> None:
    query, poisoned, clean, meta = compressed_batch(seqs, 6, 2, 32, seed=3)
    out = paged_attention_ref(query, poisoned, meta, 0.2)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), dense_from_starts(query, clean, meta, 0.2),
                               atol=1e-5, rtol=1e-5)


def test_reference_groups_only_the_sequences_holding_their_whole_context() -> None:
    query, poisoned, clean, meta = compressed_batch(SHARED, 4, 2, 16, seed=5)
    share(meta)
    expected = dense_from_starts(query, clean, meta, 0.25)
    out = paged_attention_ref(query, poisoned, meta, 0.25)
    assert [g.rows.tolist() for g in meta.ref_plan.shared] == [[0, 1]]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# ----- Triton ---------------------------------------------------------------------------------
triton_marks = pytest.importorskip("tests.ops.triton_marks")
GPU, INTERPRETER = triton_marks.GPU, triton_marks.INTERPRETER

SHAPES = [pytest.param("cpu", 6, 2, 64, id="interpreter-h6-kv2-d64", marks=INTERPRETER),
          pytest.param("cuda", 32, 8, 128, id="cuda-h32-kv8-d128", marks=GPU)]


def _to(meta: AttentionMetadata, dev: torch.device) -> None:
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables", "kv_starts"):
        setattr(meta, name, getattr(meta, name).to(dev))


@pytest.mark.parametrize("seqs", [DECODES, CHUNKS], ids=["decode-kernel", "extend-kernel"])
@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", SHAPES)
def test_triton_kernels_attend_from_each_kv_start(device: str, num_heads: int,
                                                  num_kv_heads: int, head_dim: int,
                                                  seqs: list[tuple[int, int, int]]) -> None:
    from taskloom.ops.triton import attention
    query, poisoned, clean, meta = compressed_batch(seqs, num_heads, num_kv_heads, head_dim,
                                                    seed=1)
    expected = dense_from_starts(query, clean, meta, 0.125).float()
    dev = torch.device(device)
    _to(meta, dev)
    out = attention.paged_attention(query.to(dev), poisoned.to(dev), meta, 0.125)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", SHAPES)
def test_triton_decode_with_fixed_splits_and_a_shared_prefix_group(
        device: str, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """A CUDA graph fixes the splits: they cover each sequence's context from its kv_start.
    With a group sharing a prefix in the same step, the compressed sequence (in no group)
    still starts at its kv_start."""
    from taskloom.ops.triton import attention
    from taskloom.ops.triton.decode_attention import paged_decode_attention
    query, poisoned, clean, meta = compressed_batch(DECODES, num_heads, num_kv_heads,
                                                    head_dim, seed=2)
    expected = dense_from_starts(query, clean, meta, 0.125).float()
    dev = torch.device(device)
    _to(meta, dev)
    for splits in (1, 3, 8):
        out = paged_decode_attention(query.to(dev), poisoned.to(dev), meta.block_tables,
                                     meta.seq_lens, 0.125, meta.max_seq_len, splits,
                                     kv_starts=meta.kv_starts)
        torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=2e-5)
    query, poisoned, clean, meta = compressed_batch(SHARED, num_heads, num_kv_heads,
                                                    head_dim, seed=4)
    share(meta)
    expected = dense_from_starts(query, clean, meta, 0.125).float()
    meta.shared_prefix_groups = [PrefixGroup((0, 1), 2)]
    _to(meta, dev)
    out = attention.paged_attention(query.to(dev), poisoned.to(dev), meta, 0.125)
    torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=2e-5)
