"""Which decodes of a step share a cached prefix: the groups that shared-prefix attention
(Hydragen, cascade attention) attends to their prefix together.

Sequences share a prefix when their block tables start with the same blocks: the prefix cache
gave them the same system prompt or few-shot examples, or they are the n samples of one
prompt. A group's prefix is the leading blocks all its members hold, each member keeping at
least its newest token outside it (its own suffix is never empty). Found on the host from the
block tables the runner already has, once per step; every layer's attention uses the result.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefixGroup:
    """Decodes (rows of the batch, in order) that share their first `num_blocks` blocks."""

    rows: tuple[int, ...]
    num_blocks: int


def shared_prefix_groups(tables: np.ndarray, seq_lens: Sequence[int], decodes: Sequence[int],
                         block_size: int) -> list[PrefixGroup]:
    """The groups among `decodes` (rows of `tables` [num_seqs, max_blocks], padded, and of
    `seq_lens`): decodes grouped by their first block, each group with the number of leading
    blocks all of them share. Groups of one, or sharing no full block, are left out."""
    by_first: dict[int, list[int]] = {}
    for i in decodes:
        by_first.setdefault(int(tables[i, 0]), []).append(i)
    groups = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        limit = min((seq_lens[i] - 1) // block_size for i in rows)
        if limit < 1:
            continue
        lead = tables[rows, :limit]                                   # [g, limit]
        same = (lead == lead[0]).all(axis=0)                          # [limit]
        common = limit if same.all() else int(same.argmin())
        if common:
            groups.append(PrefixGroup(tuple(rows), common))
    return groups


def saved_token_reads(groups: Sequence[PrefixGroup], block_size: int) -> int:
    """Tokens of KV that attending each group's prefix once saves reading, against every
    member reading it."""
    return sum((len(g.rows) - 1) * g.num_blocks * block_size for g in groups)


def may_share(first_blocks: Sequence[int]) -> bool:
    """A cheap test before `shared_prefix_groups`: whether two sequences start in one block."""
    return len(set(first_blocks)) < len(first_blocks)
