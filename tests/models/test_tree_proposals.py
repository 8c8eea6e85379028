"""Draft heads guessing token trees: with random Medusa and Hydra heads (own lm heads and the
base's, full and truncated vocabularies), every node's guess is the head's guess of its rank
computed on its own (for Hydra, after reading that node's path), and the tree of best guesses
is the chain `propose` drafts."""
from __future__ import annotations

import pytest
import torch

from taskloom.engine.draft_tree import TokenTree
from taskloom.models.hydra import HydraConfig, HydraHeads
from taskloom.models.medusa import MedusaConfig, MedusaHeads

H, V, CPU = 32, 200, torch.device("cpu")
TREE = TokenTree(((0,), (1,), (2,), (3,), (0, 0), (0, 1), (1, 0), (2, 0), (1, 1),
                  (0, 0, 0), (1, 1, 0), (1, 0, 2)))
CHAIN = TokenTree(((0,), (0, 0), (0, 0, 0)))


def randomize(heads: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def medusa(token_map: torch.Tensor | None, own: bool, gen: torch.Generator) -> MedusaHeads:
    n = V if token_map is None else len(token_map)
    cfg = MedusaConfig(3, 1, H, V, num_lm_heads=3 if own else 0,
                       truncated_vocab_size=None if token_map is None else n)
    heads = MedusaHeads(cfg, torch.randn(V, H, generator=gen), torch.float32, CPU, token_map)
    randomize(heads, gen)
    return heads


def hydra(token_map: torch.Tensor | None, own: bool, gen: torch.Generator) -> HydraHeads:
    n = V if token_map is None else len(token_map)
    heads = HydraHeads(HydraConfig(3, 2, H, V, own, None if token_map is None else n),
                       torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen),
                       torch.float32, CPU, token_map)
    randomize(heads, gen)
    return heads


def rank_of(logits: torch.Tensor, rank: int, heads: torch.nn.Module) -> torch.Tensor:
    return heads.vocab.ids(logits.topk(rank + 1, dim=-1).indices[:, rank])


def one_node(heads: torch.nn.Module, hidden: torch.Tensor, sampled: torch.Tensor,
             path: tuple[int, ...], tokens: dict[tuple[int, ...], torch.Tensor]
             ) -> torch.Tensor:
    """The guess at `path` computed alone from its ancestors' guesses `tokens`."""
    d = len(path) - 1
    if isinstance(heads, MedusaHeads):
        state = heads.hidden(hidden)[d]
    else:
        ctx = [hidden, heads.embed[sampled]] + [heads.embed[tokens[path[:j]]]
                                               for j in range(1, d + 1)]
        state = heads.head_state(d, torch.cat(ctx, dim=-1))
    return rank_of(heads.head_logits(d, state), path[-1], heads)


@pytest.mark.parametrize("kind", ["medusa", "medusa-own-lm", "medusa-truncated", "hydra",
                                  "hydra-own-lm", "hydra-truncated"])
def test_every_node_is_its_heads_guess_of_its_rank(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    token_map = (torch.randperm(V, generator=gen)[:64].sort().values if "truncated" in kind
                 else None)
    own = kind.endswith("own-lm")
    heads = medusa(token_map, own, gen) if kind.startswith("medusa") else hydra(token_map, own,
                                                                                gen)
    hidden = torch.randn(5, H, generator=gen)
    sampled = torch.randint(0, V, (5,), generator=gen)
    got = heads.propose_tree(hidden, sampled, TREE)                     # [5, nodes]
    assert got.shape == (5, TREE.num_nodes) and got.dtype == torch.int64
    tokens: dict[tuple[int, ...], torch.Tensor] = {}
    for i, path in enumerate(TREE.paths):
        tokens[path] = one_node(heads, hidden, sampled, path, tokens)
        assert torch.equal(got[:, i], tokens[path]), path
    for i, p in enumerate(TREE.parents):        # siblings differ: one child at most matches
        siblings = [j for j, q in enumerate(TREE.parents) if q == p and j != i]
        assert all((got[:, i] != got[:, j]).all() for j in siblings)
    assert torch.equal(heads.propose_tree(hidden, sampled, CHAIN),
                       heads.propose(hidden, sampled, 3))
