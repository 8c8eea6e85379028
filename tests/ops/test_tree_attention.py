"""Token-tree attention: a sequence whose chunk is a tree of draft nodes attends to its whole
cached context and, within the chunk, to each node's ancestors and itself only. The torch
reference against attention computed node by node from the gathered keys, and the Triton
extend kernel (through the interpreter on the CPU, compiled on a GPU) against the reference,
in one batch with causal chunks and decodes. The same trees split into one decode a node (as
CUDA graphs replay them: each node's view of its chunk as bits), through the reference and
the decode kernel (its own splits and the fixed splits of a graph), give the same."""
from __future__ import annotations

import pytest
import torch

from taskloom.config import AttentionWindow

from taskloom.ops.attention import gather_context, paged_attention_ref
from taskloom.runtime.attention import AttentionMetadata, set_tree_masks, tree_bits, tree_mask
from tests.models.single_seq import make_metadata

from tests.ops.triton_marks import GPU, INTERPRETER
from taskloom.ops.triton import attention  # noqa: E402
from taskloom.ops.triton.decode_attention import paged_decode_attention  # noqa: E402

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


def as_decodes(cases: list[tuple[int, int | str]], meta: AttentionMetadata,
               trees: dict[int, list[int]], device: str) -> AttentionMetadata:
    """The batch of `tree_batch` with every query its own decode: a tree node sees the
    context before its chunk and its ancestors (decode_tree_lo / _bits), a chunk's token
    the context up to itself."""
    tables, cached, lo, bits = [], [], [], []
    qsl = meta.query_start_loc_cpu
    for i, (c, _) in enumerate(cases):
        table = meta.block_tables[i].tolist()
        n = qsl[i + 1] - qsl[i]
        tables += [table] * n
        cached += [c + j for j in range(n)]
        if i in trees:
            lo += [c] * n
            bits += list(tree_bits(tuple(trees[i])))
        else:
            lo += [c + j + 1 for j in range(n)]
            bits += [0] * n
    out, _ = make_metadata(tables, cached, [1] * len(cached), BLOCK_SIZE, torch.device(device))
    out.decode_tree_lo_cpu, out.decode_tree_bits_cpu = lo, bits
    out.decode_tree_lo = torch.tensor(lo, dtype=torch.int32, device=device)
    out.decode_tree_bits = torch.tensor(bits, dtype=torch.int64, device=device)
    return out


def test_tree_bits_are_the_masks_rows() -> None:
    assert tree_bits((0, 0, 1)) == (0b1, 0b11, 0b101, 0b1011)
    with pytest.raises(ValueError, match="63-bit"):
        tree_bits(tuple(range(63)))


def test_reference_attends_tree_nodes_split_into_decodes_alike() -> None:
    query, cache, meta, trees = tree_batch(CASES["cpu"], 6, 2, 16, "cpu")
    decodes = as_decodes(CASES["cpu"], meta, trees, "cpu")
    torch.testing.assert_close(paged_attention_ref(query, cache, decodes, 0.25),
                               paged_attention_ref(query, cache, meta, 0.25),
                               atol=2e-5, rtol=2e-5)


def test_cpu_decode_kernel_hands_tree_nodes_to_the_reference() -> None:
    """Tree nodes attended as decodes see only their ancestors of the chunk, a mask the C
    decode kernel does not take: their decode batch is the reference's."""
    from taskloom.ops import cpu_kernels
    if cpu_kernels.library() is None:
        pytest.skip("the C kernels do not build here")
    query, cache, meta, trees = tree_batch(CASES["cpu"], 6, 2, 16, "cpu")
    query, cache = query.bfloat16(), cache.bfloat16()
    decodes = as_decodes(CASES["cpu"], meta, trees, "cpu")
    out = cpu_kernels.paged_attention(query, cache, decodes, 0.25)
    assert decodes.ref_plan.decode_lens is None
    decodes.ref_plan = None
    assert torch.equal(out, paged_attention_ref(query, cache, decodes, 0.25))


@pytest.mark.parametrize("num_splits", [None, 4], ids=["own-splits", "graph-splits"])
@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", SHAPES)
def test_decode_kernel_attends_tree_nodes_by_their_bits(device: str, num_heads: int,
                                                        num_kv_heads: int, head_dim: int,
                                                        num_splits: int | None) -> None:
    query, cache, meta, trees = tree_batch(CASES[device], num_heads, num_kv_heads, head_dim,
                                           device)
    decodes = as_decodes(CASES[device], meta, trees, device)
    decodes.decode_num_splits = num_splits
    scale = head_dim ** -0.5
    out = attention.paged_attention(query, cache, decodes, scale)
    torch.testing.assert_close(out, paged_attention_ref(query, cache, meta, scale),
                               atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="without shared prefixes or a sliding window"):
        paged_decode_attention(query, cache, decodes.block_tables, decodes.seq_lens, scale,
                               decodes.max_seq_len, window=AttentionWindow(64),
                               tree=(decodes.decode_tree_lo, decodes.decode_tree_bits))
