"""Token trees for speculative decoding: several guesses per position, verified in one step.

A chain of drafts is lost from its first wrong guess on. Medusa (Cai et al., 2024) and Hydra
draft a tree instead: the heads' top few guesses at each depth, combined along paths, so
that when a head's best guess is wrong its second may be right. The model scores every node
of the tree in one forward, each node attending to the context and to its own ancestors only
(the tree mask), and the step keeps the longest path of nodes the model would have produced
itself, then the token it sampled after that path's last node.

A tree is given as Medusa's `medusa_choices` (vLLM's `speculative_token_tree`): a list of
paths, each a tuple of ranks, one per depth: `(0,)` is the first head's best guess, `(1,)`
its second, `(0, 2)` the second head's third-best guess after `(0,)`. Every prefix of a path
must be in the list. Nodes are numbered in the order (depth, ranks): node 0 is the root, the
sequence's newest token (the one the step computes anyway), and draft node i is node i + 1.
In that order every node's parent comes before it, so the first n draft nodes always form a
tree of their own: a step with less room for drafts takes a prefix of the node list.

Pure Python, as the engine is.
"""
from __future__ import annotations

import ast
import functools
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

Path = tuple[int, ...]


def is_chain(parents: Sequence[int]) -> bool:
    """Whether the tree given by its draft nodes' parents is a chain."""
    return all(p == i for i, p in enumerate(parents))


@functools.lru_cache(maxsize=256)
def depths(parents: tuple[int, ...] | range) -> tuple[int, ...]:
    """The depth of each node (root 0, then each draft node) of a tree given by its draft
    nodes' parents (a tuple, or a range for a chain); kept per tree, as every step of a
    request asks again."""
    out = [0]
    for p in parents:
        out.append(out[p] + 1)
    return tuple(out)


def accepted_path(parents: Sequence[int], drafts: Sequence[int], sampled: Sequence[int]
                  ) -> list[int]:
    """The draft indexes the model agreed with, root to leaf: `sampled[n]` is the token the
    model sampled after node n (root 0, draft i at node i + 1); a child whose draft equals
    its parent's sampled token is kept, and the walk goes on from it. Siblings hold
    different tokens, so at most one child matches."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    path: list[int] = []
    node = 0
    while True:
        want = sampled[node]
        nxt = next((i for i in children.get(node, ()) if drafts[i] == want), None)
        if nxt is None:
            return path
        path.append(nxt)
        node = nxt + 1


def parse_tree(value: object) -> tuple[Path, ...]:
    """A tree's paths from a list of rank lists, or from its text as vLLM takes it
    (`"[(0,), (1,), (0, 0)]"`); ValueError on anything else."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"speculative_token_tree {value!r} is not a list of tuples of "
                             "ranks, such as \"[(0,), (1,), (0, 0)]\"") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"speculative_token_tree must be a non-empty list of paths (lists "
                         f"of ranks), got {value!r}")
    paths = []
    for p in value:
        if (not isinstance(p, (list, tuple)) or not p
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                           for r in p)):
            raise ValueError(f"speculative_token_tree: each path must be a non-empty list of "
                             f"ranks >= 0, got {p!r}")
        paths.append(tuple(p))
    return tuple(paths)


@dataclass(frozen=True)
class TokenTree:
    """A tree of draft positions: each draft node's path of ranks, its parent node and its
    depth, in node order (see the module docstring)."""

    paths: tuple[Path, ...]

    def __post_init__(self) -> None:
        paths = sorted(set(self.paths), key=lambda p: (len(p), p))
        if len(paths) != len(self.paths):
            raise ValueError("speculative_token_tree names a path twice")
        known = set(paths)
        for p in paths:
            if len(p) > 1 and p[:-1] not in known:
                raise ValueError(f"speculative_token_tree: path {list(p)} has no parent "
                                 f"{list(p[:-1])} in the tree")
        object.__setattr__(self, "paths", tuple(paths))

    @property
    def num_nodes(self) -> int:
        """Draft nodes (the root not counted)."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        return len(self.paths[-1])

    @property
    def parents(self) -> tuple[int, ...]:
        """Each draft node's parent node (0: the root)."""
        index = {p: i + 1 for i, p in enumerate(self.paths)}
        return tuple(index.get(p[:-1], 0) for p in self.paths)

    @property
    def top_chain(self) -> list[int]:
        """The draft nodes of the path of best guesses ((0,), (0, 0), ...), as far as the
        tree holds it: what a request that takes chains only is drafted."""
        index = {p: i for i, p in enumerate(self.paths)}
        out = []
        for d in range(1, self.depth + 1):
            i = index.get((0,) * d)
            if i is None:
                break
            out.append(i)
        return out

    def max_rank(self, depth: int) -> int:
        """The largest rank the tree asks of the guesses at `depth` (1-based)."""
        return max((p[-1] for p in self.paths if len(p) == depth), default=-1)

    def num_within(self, max_nodes: int, max_depth: int) -> int:
        """How many draft nodes a step keeps with room for `max_nodes` and drafts up to
        `max_depth` deep: the first ones in node order (a tree again)."""
        n = 0
        while n < len(self.paths) and n < max_nodes and len(self.paths[n]) <= max_depth:
            n += 1
        return n


def best_tree(accuracy: Sequence[Sequence[float]], num_nodes: int) -> tuple[Path, ...]:
    """The tree of `num_nodes` draft nodes that keeps the most drafts a step on average, for
    heads whose guess of rank r at depth d is right with probability `accuracy[d - 1][r]`
    (each head taken on its own, as Medusa's paper builds its trees): a node is kept when
    its path is right, with the product of its ranks' accuracies, and the expected number
    kept is the sum of those over the tree. Adding the likeliest node that extends the tree,
    one at a time, builds the best tree (a path is never likelier than its parent)."""
    if num_nodes < 1:
        raise ValueError(f"a tree needs at least 1 node, got {num_nodes}")
    depth = len(accuracy)
    frontier = [(-p, (r,)) for r, p in enumerate(accuracy[0])]
    heapq.heapify(frontier)
    paths: list[Path] = []
    while frontier and len(paths) < num_nodes:
        neg, path = heapq.heappop(frontier)
        paths.append(path)
        if len(path) < depth:
            for r, p in enumerate(accuracy[len(path)]):
                heapq.heappush(frontier, (neg * p, path + (r,)))
    return TokenTree(tuple(paths)).paths


def expected_kept(paths: Sequence[Path], accuracy: Sequence[Sequence[float]]) -> float:
    """The drafts a step keeps on average with the tree `paths`, under `best_tree`'s
    model of the heads."""
    total = 0.0
    for path in paths:
        p = 1.0
        for d, r in enumerate(path):
            p *= accuracy[d][r] if r < len(accuracy[d]) else 0.0
        total += p
    return total
