"""Token-tree attention: a sequence whose chunk is a tree of draft nodes attends to its whole
cached context and, within the chunk, to each node's ancestors and itself only. The torch
reference against attention computed node by node from the gathered keys, and the Triton
extend kernel (through the interpreter on the CPU, compiled on a GPU) against the reference,
in one batch with causal chunks and decodes."""
from __future__ import annotations

import pytest
import torch

from taskloom.ops.attention import gather_context, paged_attention_ref
from taskloom.runtime.attention import AttentionMetadata, set_tree_masks, tree_mask
from tests.models.single_seq import make_metadata

from tests.ops.triton_marks import GPU, INTERPRETER
from taskloom.ops.triton import attention  # noqa: E402

BLOCK_SIZE = 16
# (cached tokens, chunk) per sequence; "tree" chunks are a root and random draft nodes
CASES = {"cpu": [(30, "tree9"), (0, 5), (17, 1), (40, "tree4"), (3, "tree17")],
         "cuda": [(3000, "tree64"), (1000, 1), (0, 512), (17, "tree8"), (4000, "tree33")]}
SHAPES = [pytest.param("cpu", 6, 2, 64, id="interpreter-h6-kv2-d64", marks=INTERPRETER),
          pytest.param("cuda", 32, 8, 128, id="cuda-h32-kv8-d128", marks=GPU)]


def random_parents(num_drafts: int, gen: torch.Generator) -> list[int]:
    """Draft node i + 1's parent: any node before it (the root 0 included)."""
    return [int(torch.randint(0, i + 1, (1,), generator=gen)) for i in range(num_drafts)]


def tree_batch(cases: list[tuple[int, int | str]], num_heads: int, num_kv_heads: int,
               head_dim: int, device: str, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, dict[int, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    lens = [int(n[4:]) if isinstance(n, str) else n for _, n in cases]
    counts = [-(-(c + n) // BLOCK_SIZE) for (c, _), n in zip(cases, lens)]
    num_blocks = sum(counts) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(count)] for count in counts]
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(sum(lens), num_heads, head_dim, generator=gen)
    meta, _ = make_metadata(tables, [c for c, _ in cases], lens, BLOCK_SIZE,
                            torch.device(device))
    trees = {i: random_parents(n - 1, gen) for i, ((_, kind), n) in enumerate(zip(cases, lens))
             if isinstance(kind, str)}
    set_tree_masks(meta, list(trees.items()))
    return query.to(device), cache.to(device), meta, trees


def node_by_node(query: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                 trees: dict[int, list[int]], scale: float) -> torch.Tensor:
    """Each query of each sequence attending to the keys it may see, one at a time."""
    out = torch.empty_like(query)
    qsl, group = meta.query_start_loc_cpu, query.shape[1] // cache.shape[3]
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        k, v = gather_context(cache, meta.block_tables[i], seq_len)
        q_len = qsl[i + 1] - qsl[i]
        prefix = seq_len - q_len
        see = (tree_mask(tuple(trees[i])) if i in trees
               else torch.ones(q_len, q_len, dtype=torch.bool).tril())
        for j in range(q_len):
            keys = list(range(prefix)) + [prefix + c for c in range(q_len) if see[j, c]]
            kj = k[keys].repeat_interleave(group, dim=1)       # [n, num_heads, d]
            vj = v[keys].repeat_interleave(group, dim=1)
            q = query[qsl[i] + j]                              # [num_heads, d]
            w = torch.softmax((kj * q).sum(-1) * scale, dim=0)  # [n, num_heads]
            out[qsl[i] + j] = (w[..., None] * vj).sum(0)
    return out


def test_tree_mask_sees_ancestors_and_self() -> None:
    # root -> 1 -> 3, root -> 2
    assert tree_mask((0, 0, 1)).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0],
                                                   [1, 0, 1, 0], [1, 1, 0, 1]]


def test_reference_attends_each_node_to_its_ancestors() -> None:
    query, cache, meta, trees = tree_batch(CASES["cpu"], 6, 2, 16, "cpu")
    torch.testing.assert_close(paged_attention_ref(query, cache, meta, 0.25),
                               node_by_node(query, cache, meta, trees, 0.25),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", SHAPES)
def test_extend_kernel_matches_reference_on_trees(device: str, num_heads: int,
                                                  num_kv_heads: int, head_dim: int,
                                                  dtype: torch.dtype) -> None:
    query, cache, meta, _ = tree_batch(CASES[device], num_heads, num_kv_heads, head_dim,
                                       device)
    query, cache = query.to(dtype), cache.to(dtype)
    scale = head_dim ** -0.5
    out = attention.paged_attention(query, cache, meta, scale)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(),
                               paged_attention_ref(query.float(), cache.float(), meta, scale),
                               atol=tol, rtol=tol)
