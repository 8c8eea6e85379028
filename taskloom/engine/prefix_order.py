"""Prefix-aware admission order for a known batch (offline generation, batch jobs).

Walking a token trie of the prompts depth-first visits every group of prompts that share a
prefix contiguously, deepest shared prefixes innermost; that order is exactly the
lexicographic order of the token lists. Admitted in it, each group's shared blocks are computed
by its first request, found in the prefix cache by the rest while they are still the most
recently used, and not evicted by other groups before the group is done.
"""
from __future__ import annotations

from collections.abc import Sequence


def prefix_grouped_order(prompts: Sequence[Sequence[int]],
                         groups: Sequence[int] | None = None) -> list[int]:
    """Indices of `prompts` in trie (lexicographic) order; ties keep their input order. With
    `groups` (e.g. adapter ids: requests of different adapters share no KV), prompts are
    ordered by group first, then by trie within each group."""
    if groups is None:
        return sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    return sorted(range(len(prompts)), key=lambda i: (groups[i], list(prompts[i])))
