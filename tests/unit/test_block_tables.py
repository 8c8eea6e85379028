"""The runner's persistent block tables (numpy, no torch): after every sync, the step's
tables equal the scheduler's live lists padded with 0, whatever happened to the lists since."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest

from taskloom.runtime.block_tables import BlockTables


@dataclass
class Seq:
    req_id: str
    block_ids: list[int]


def padded(seqs: list[Seq]) -> list[list[int]]:
    width = max(len(s.block_ids) for s in seqs)
    return [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs]


def step(tables: BlockTables, seqs: list[Seq]) -> list[list[int]]:
    rows, width = tables.sync(seqs)
    out = tables.tables(rows, width)
    assert out.dtype == np.int32
    return out.tolist()


def test_appended_blocks_are_written_and_rows_are_padded() -> None:
    tables = BlockTables(max_blocks_per_seq=8, rows=4)
    a, b = Seq("a", [3, 4]), Seq("b", [9])
    assert step(tables, [a, b]) == [[3, 4], [9, 0]]
    a.block_ids.append(7)                           # the live list grows in place
    assert step(tables, [b, a]) == [[9, 0, 0], [3, 4, 7]]
    assert step(tables, [b]) == [[9]]               # the width is the step's own


def test_a_new_list_rewrites_the_row_and_clears_its_old_tail() -> None:
    tables = BlockTables(max_blocks_per_seq=8, rows=4)
    a = Seq("a", [3, 4, 5, 6])
    step(tables, [a])
    a.block_ids = [11]          # preempted, then admitted again: a new, shorter list
    assert step(tables, [a, Seq("b", [1, 2, 3, 4])]) == [[11, 0, 0, 0], [1, 2, 3, 4]]


def test_a_freed_row_holds_nothing_of_its_last_owner() -> None:
    tables = BlockTables(max_blocks_per_seq=8, rows=1)
    step(tables, [Seq("a", [5, 6, 7])])
    tables.remove("a")
    tables.remove("never-seen")                     # ignored
    assert step(tables, [Seq("b", [8]), Seq("c", [1, 2])]) == [[8, 0], [1, 2]]
    assert tables.num_rows == 2                     # "c" grew the table; "b" took a's row
    assert tables.table[0].tolist() == [8] + [0] * 7


def test_growing_keeps_every_row() -> None:
    tables = BlockTables(max_blocks_per_seq=4, rows=2)
    seqs = [Seq(str(i), [i + 1, i + 2]) for i in range(9)]
    assert step(tables, seqs) == padded(seqs)
    assert tables.num_rows == 16
    assert step(tables, seqs[::-1]) == padded(seqs[::-1])


def test_a_table_wider_than_the_context_needs_is_refused() -> None:
    tables = BlockTables(max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="3 blocks exceeds the 2"):
        tables.sync([Seq("a", [1, 2, 3])])


@pytest.mark.parametrize("seed", range(5))
def test_random_steps_match_the_live_lists(seed: int) -> None:
    """Requests arrive, grow, are preempted (new lists, any length), finish and leave, and
    each step schedules a random subset in a random order."""
    rng = random.Random(seed)
    tables = BlockTables(max_blocks_per_seq=12, rows=2)
    live: dict[str, Seq] = {}
    for t in range(300):
        action = rng.random()
        if action < 0.15 or not live:
            rid = f"r{t}"
            live[rid] = Seq(rid, [rng.randrange(1, 500) for _ in range(rng.randrange(1, 4))])
        elif action < 0.25:
            rid = rng.choice(sorted(live))
            del live[rid]
            tables.remove(rid)
        elif action < 0.35:
            seq = live[rng.choice(sorted(live))]
            seq.block_ids = [rng.randrange(1, 500) for _ in range(rng.randrange(1, 12))]
        if not live:
            continue
        for seq in live.values():
            if rng.random() < 0.3 and len(seq.block_ids) < 12:
                seq.block_ids.append(rng.randrange(1, 500))
        scheduled = rng.sample(sorted(live.values(), key=lambda s: s.req_id),
                               rng.randrange(1, len(live) + 1))
        assert step(tables, scheduled) == padded(scheduled)
