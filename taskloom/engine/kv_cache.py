"""Paged KV-cache accounting: a pool of fixed-size blocks, per-request block tables, ref counts.

Pure bookkeeping: the tensors that hold K and V live in the model runner and are indexed by
the block ids handed out here. Blocks are handed out from the front of the free queue and
given back at its end, a request's blocks in reverse order (its tail first), so that the
order of reuse is deterministic and exact in tests.
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    """Fixed number of KV blocks with reference counts."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_cnt = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (ref count 1 each); the caller checked there are enough."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_cnt[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go back to the free queue."""
        for b in blocks:
            if self._ref_cnt[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self._ref_cnt[b] -= 1
            if self._ref_cnt[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_cnt[block]


class KVCacheManager:
    """Block tables of the running requests over one `BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool in use, 0.0 to 1.0."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, req_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's block table to hold `num_tokens` tokens in all.

        Returns the whole table, or None (and changes nothing) when the pool is short.
        """
        table = self.block_tables.setdefault(req_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.pool.num_free_blocks:
            if not table:
                del self.block_tables[req_id]
            return None
        if need > 0:
            table.extend(self.pool.allocate(need))
        return table

    def free(self, req_id: str) -> None:
        """Give back every block of the request (no-op for a request holding none)."""
        table = self.block_tables.pop(req_id, None)
        if table:
            self.pool.free(table[::-1])
