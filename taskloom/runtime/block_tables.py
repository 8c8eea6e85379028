"""The runner's copy of its requests' block tables, kept in one numpy array across steps.

Every step the scheduler hands each scheduled sequence its live block list. Building a padded
`[num_seqs, max_blocks]` array from those lists anew each step cost the host about 0.3 ms at
256 sequences, and a CUDA graph's staging paid it again; yet a decode step adds a block to
only one sequence in `block_size`. So each request the runner knows keeps a row here
(vLLM's persistent batch keeps its block tables the same way): a step writes only the blocks
a list gained since, or the whole row when the list is a new one (a preempted request
admitted again gets a new list), and the step's tables are one fancy-index of the rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class _HasBlocks(Protocol):
    req_id: str
    block_ids: list[int]


class BlockTables:
    """Rows of block ids by request, padded with 0, `max_blocks_per_seq` wide."""

    def __init__(self, max_blocks_per_seq: int, rows: int = 64) -> None:
        if max_blocks_per_seq < 1 or rows < 1:
            raise ValueError(f"need at least one row and one block per row, got {rows} rows of "
                             f"{max_blocks_per_seq}")
        self.table = np.zeros((rows, max_blocks_per_seq), dtype=np.int32)  # [rows, max_blocks]
        self._row_of: dict[str, int] = {}
        self._lists: list[list[int] | None] = [None] * rows   # the list each row copies
        self._lens: list[int] = [0] * rows                     # blocks written in each row
        self._free = list(range(rows - 1, -1, -1))

    @property
    def num_rows(self) -> int:
        return self.table.shape[0]

    @property
    def num_requests(self) -> int:
        """Requests holding a row."""
        return len(self._row_of)

    def sync(self, seqs: Sequence[_HasBlocks]) -> tuple[np.ndarray, int]:
        """Bring the rows of `seqs` up to date with their block lists; their rows [num_seqs]
        and the most blocks any of them holds (the step's table width)."""
        rows = []
        width = 0
        row_of, lists, lens = self._row_of, self._lists, self._lens
        for seq in seqs:
            row = row_of.get(seq.req_id)
            if row is None:
                row = self._add(seq.req_id)
            blocks = seq.block_ids
            n = len(blocks)
            if lists[row] is not blocks:
                self._write(row, blocks, 0)
            elif n != lens[row]:
                self._write(row, blocks, lens[row])
            rows.append(row)
            if n > width:
                width = n
        return np.array(rows, dtype=np.intp), width

    def tables(self, rows: np.ndarray, width: int) -> np.ndarray:
        """The step's block tables [len(rows), width] int32, a copy."""
        return self.table[rows, :width]

    def remove(self, req_id: str) -> None:
        """Free a finished request's row (unknown ids are ignored)."""
        row = self._row_of.pop(req_id, None)
        if row is not None:
            self._lists[row] = None     # the next owner rewrites it (and zeroes the rest)
            self._free.append(row)

    def _add(self, req_id: str) -> int:
        if not self._free:
            old = self.num_rows
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._lists += [None] * old
            self._lens += [0] * old
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._free.pop()
        self._row_of[req_id] = row
        return row

    def _write(self, row: int, blocks: list[int], start: int) -> None:
        n, old = len(blocks), self._lens[row]
        if n > self.table.shape[1]:
            raise ValueError(f"a block table of {n} blocks exceeds the {self.table.shape[1]} "
                             f"that the model's context length needs")
        self.table[row, start:n] = blocks[start:]
        if start == 0 and old > n:
            self.table[row, n:old] = 0
        self._lists[row] = blocks
        self._lens[row] = n
