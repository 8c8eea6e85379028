"""Test helper: a step's paged batch with scattered block tables, for the attention kernels
(Triton and C) against the torch reference."""
from __future__ import annotations

import torch

from taskloom.runtime.attention import AttentionMetadata
from tests.models.single_seq import make_metadata

BLOCK_SIZE = 16


def paged_batch(seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: str,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random queries, a random cache with scattered block tables, and the step's metadata."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-(c + n) // BLOCK_SIZE) for c, n in seqs]
    num_blocks = sum(counts) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(count)] for count in counts]
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(sum(n for _, n in seqs), num_heads, head_dim, generator=gen)
    meta, _ = make_metadata(tables, [c for c, _ in seqs], [n for _, n in seqs], BLOCK_SIZE,
                            torch.device(device))
    return query.to(device, dtype), cache.to(device, dtype), meta
