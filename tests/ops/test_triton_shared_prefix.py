"""The decode kernel's shared-prefix path (cascade / Hydragen attention) against the torch
reference: groups of decodes whose block tables start with the same blocks attend to that
prefix together, tiles of members at a time, and to their own tokens after it; the merge must
give what every sequence attending alone gives. Through the Triton interpreter without CUDA,
compiled with real shapes on the GPU (`gpu`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from taskloom.ops.attention import paged_attention_ref
from taskloom.runtime.shared_prefix import PrefixGroup, shared_prefix_groups
from tests.models.single_seq import make_metadata

from tests.ops.triton_marks import DTYPES, GPU, INTERPRETER
from taskloom.ops.triton import attention, decode_attention  # noqa: E402
from taskloom.ops.triton.decode_attention import (  # noqa: E402
    paged_decode_attention,
    shared_prefix_plan,
)

BLOCK_SIZE = 16
ATTN_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# (device, heads, kv heads, head dim, tile rows, layout): a layout is the groups' (prefix
# blocks, own tokens of each member) and the lone sequences' lengths. The interpreter's tiles
# are small (16 rows: 5 members of 3 heads, 4 of 4) so that a group spans several tiles; its
# 160-token prefix and 130-token suffix span several 64-token key tiles, so that with
# many splits several of them hold keys.
CASES = [
    pytest.param("cpu", 6, 2, 64, 16,
                 ([(10, [1, 17, 40, 5, 16, 2, 130]), (2, [3, 1, 20])], [150, 1]),
                 id="interpreter-h6-kv2-d64", marks=INTERPRETER),
    pytest.param("cpu", 4, 1, 128, 16, ([(1, [1, 1]), (3, [9, 30, 2, 64, 7])], [70]),
                 id="interpreter-h4-kv1-d128", marks=INTERPRETER),
    pytest.param("cuda", 32, 8, 128, 64,
                 ([(125, [64 - i % 64 for i in range(200)]), (40, [1, 700, 33])], [2047, 1]),
                 id="cuda-h32-kv8-d128-200-share-2000", marks=GPU),
    pytest.param("cuda", 28, 4, 128, 64, ([(8, list(range(1, 40))), (250, [3, 4])], [4000]),
                 id="cuda-h28-kv4-d128", marks=GPU),
]


def shared_batch(layout, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str, seed: int):
    """Random queries and cache; tables whose groups start with the same (scattered) blocks.
    Returns query, cache, metadata and the groups the tables make."""
    groups, lone = layout
    gen = torch.Generator().manual_seed(seed)
    need = sum(p + sum(-(-own // BLOCK_SIZE) for own in owns) for p, owns in groups)
    need += sum(-(-n // BLOCK_SIZE) for n in lone) + 2
    free = torch.randperm(need, generator=gen).tolist()
    tables, lens = [], []
    for prefix_blocks, owns in groups:
        prefix = [free.pop() for _ in range(prefix_blocks)]
        for own in owns:
            tables.append(prefix + [free.pop() for _ in range(-(-own // BLOCK_SIZE))])
            lens.append(prefix_blocks * BLOCK_SIZE + own)
    for n in lone:
        tables.append([free.pop() for _ in range(-(-n // BLOCK_SIZE))])
        lens.append(n)
    order = torch.randperm(len(tables), generator=gen).tolist()   # groups interleave
    tables, lens = [tables[i] for i in order], [lens[i] for i in order]
    cache = torch.randn(2, need, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(len(tables), num_heads, head_dim, generator=gen)
    meta, _ = make_metadata(tables, [n - 1 for n in lens], [1] * len(lens), BLOCK_SIZE,
                            torch.device(device))
    found = shared_prefix_groups(meta.block_tables.cpu().numpy(), lens, range(len(lens)),
                                 BLOCK_SIZE)
    return query.to(device, dtype), cache.to(device, dtype), meta, found


def alone_reference(query, cache, meta, scale):
    """The float32 torch reference with every sequence attending alone."""
    meta.shared_prefix_groups, meta.ref_plan = [], None
    return paged_attention_ref(query.float(), cache.float(), meta, scale)


@pytest.mark.parametrize("split_tokens", [None, 16], ids=["default-splits", "many-splits"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim,block_m,layout", CASES)
def test_shared_prefix_decode_matches_attending_alone(
        device: str, num_heads: int, num_kv_heads: int, head_dim: int, block_m: int, layout,
        dtype: torch.dtype, split_tokens: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`many-splits` lets a split be as short as 16 tokens, so that the interpreter's short
    prefixes and suffixes are split several ways too (the GPU cases' are by default)."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's tl.dot multiplies bfloat16 bit patterns as "
                    "integers; bfloat16 attention is checked on the GPU")
    monkeypatch.setattr(decode_attention, "PREFIX_BLOCK_M", block_m)
    if split_tokens is not None:
        monkeypatch.setattr(decode_attention, "MIN_SPLIT_TOKENS", split_tokens)
    query, cache, meta, groups = shared_batch(layout, num_heads, num_kv_heads, head_dim,
                                              dtype, device, 3)
    # the groups the tables make: each member keeps its newest token out of the prefix
    expected_groups = sorted((len(owns), min(p, (p * BLOCK_SIZE + min(owns) - 1) // BLOCK_SIZE))
                             for p, owns in layout[0])
    assert sorted((len(g.rows), g.num_blocks) for g in groups) == expected_groups
    plan = shared_prefix_plan(groups, meta.seq_lens_cpu, BLOCK_SIZE, num_heads, num_kv_heads,
                              torch.device(device))
    per_tile = block_m // (num_heads // num_kv_heads)
    assert plan.num_work == sum(-(-len(g.rows) // per_tile) for g in groups)
    scale = head_dim ** -0.5
    expected = alone_reference(query, cache, meta, scale)
    splits = []
    real_reduce = decode_attention._reduce
    monkeypatch.setattr(decode_attention, "_reduce",
                        lambda partial, *a: splits.append(partial.shape[2]) or
                        real_reduce(partial, *a))
    out = paged_decode_attention(query, cache, meta.block_tables, meta.seq_lens, scale,
                                 meta.max_seq_len, shared=plan)
    if split_tokens is not None:        # several splits of the prefix and of the suffixes
        assert splits[0] >= 4, splits
    assert out.dtype == dtype and out.shape == query.shape
    tol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim,block_m,layout", CASES[:1]
                         + CASES[2:3])
def test_the_entry_attends_the_metadata_groups_together(
        device: str, num_heads: int, num_kv_heads: int, head_dim: int, block_m: int, layout,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`paged_attention` takes the groups the runner put in the metadata, builds the kernels'
    plan once (the first layer) and reuses it; without groups it attends every one alone."""
    query, cache, meta, groups = shared_batch(layout, num_heads, num_kv_heads, head_dim,
                                              torch.float32, device, 5)
    expected = alone_reference(query, cache, meta, 0.1)
    plans = []
    real = decode_attention.shared_prefix_plan
    monkeypatch.setattr(attention, "shared_prefix_plan",
                        lambda *a: plans.append(real(*a)) or plans[-1])
    meta.shared_prefix_groups = groups
    for _ in range(2):                                   # two layers of one step
        out = attention.paged_attention(query, cache, meta, 0.1)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert len(plans) == 1 and meta.kernel_plan is plans[0]
    meta.shared_prefix_groups, meta.kernel_plan = [], None
    torch.testing.assert_close(attention.paged_attention(query, cache, meta, 0.1), expected,
                               atol=2e-5, rtol=2e-5)
    assert meta.kernel_plan is None


def test_groups_from_block_tables() -> None:
    """Grouped by first block; the shared blocks stop where any member's table differs or
    where a member would have no token of its own left; groups of one are dropped."""
    tables = np.array([[7, 8, 9, 1], [7, 8, 9, 2], [3, 4, 0, 0], [7, 8, 5, 0], [3, 6, 0, 0],
                       [11, 0, 0, 0], [12, 13, 0, 0], [12, 13, 0, 0]])
    lens = [60, 64, 20, 40, 30, 5, 17, 32]
    groups = shared_prefix_groups(tables, lens, range(8), 16)
    assert groups == [PrefixGroup((0, 1, 3), 2), PrefixGroup((2, 4), 1),
                      PrefixGroup((6, 7), 1)]
    # row 6 holds 17 tokens: its second block has only its newest one, which stays its own
    assert shared_prefix_groups(tables, lens, [0, 1], 16) == [PrefixGroup((0, 1), 3)]
    assert shared_prefix_groups(tables, [16, 64, 20, 40, 30, 5, 17, 32], [0, 1], 16) == []
