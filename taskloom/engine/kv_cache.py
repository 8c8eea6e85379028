"""Paged KV-cache accounting: a pool of fixed-size blocks, per-request block tables, ref counts,
and automatic prefix caching.

Pure bookkeeping: the tensors that hold K and V live in the model runner and are indexed by
the block ids handed out here. Free blocks wait in an LRU queue: handed out from its front,
given back at its end, a request's blocks in reverse order (its tail first, since a prefix's
head is the part most likely to be shared), so the order of reuse is deterministic and exact
in tests.

Prefix caching: every full block of a request is named by a hash chain — the digest of its
parent block's hash, its token ids and any extra key that changes the KV (an adapter, later).
A block keeps its hash when freed, so a later request whose prompt starts with the same full
blocks takes them over (ref count + 1) and computes only the rest. A cached free block is
evicted, least recently freed first, only when the pool hands it out again. Blocks are named
as soon as they are scheduled to be filled: every layer writes the whole step's keys and values
before any attention reads them, so a request admitted in the same step may already share them.

Sliding window (KV compression): with an `AttentionWindow`, a request's blocks that lie
wholly between its attention sinks and the window of its next query are given back to the
pool as it advances; its table keeps their places as NULL_BLOCK, so block i still holds
positions i * block_size onwards. Their KV is untouched (a token's KV depends only on the
tokens before it), so they stay named in the prefix cache until reused.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from taskloom.config import AttentionWindow
from taskloom.engine.request import Request

BlockHash = bytes
# A block-table entry whose block went back to the pool: it lay wholly outside every later
# query's sliding window (see KVCacheManager.release_outside_window). Nothing reads it.
NULL_BLOCK = -1


def hash_block(parent: BlockHash | None, token_ids: list[int], extra_key: str | None = None
               ) -> BlockHash:
    """The chained digest naming one full block (collision-resistant: blocks of different
    requests, tenants or adapters must never be confused)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(array("q", token_ids).tobytes())
    if extra_key is not None:
        h.update(b"\1" + extra_key.encode())
    return h.digest()


class BlockPool:
    """Fixed number of KV blocks with reference counts, an LRU queue of free blocks and the
    map of cached (hashed) blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_cnt = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        self.max_used = 0   # the most blocks held at once (benchmarks reset it)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (ref count 1 each), evicting their cached contents; the
        caller checked there are enough."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, only {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self._ref_cnt[b] = 1
            self.uncache(b)
        self.max_used = max(self.max_used, self.num_blocks - len(self._free))
        return blocks

    def touch(self, blocks: list[int]) -> None:
        """Take one more reference to each block (cache hits); free ones leave the queue."""
        for b in blocks:
            if self._ref_cnt[b] == 0:
                del self._free[b]
            self._ref_cnt[b] += 1
        self.max_used = max(self.max_used, self.num_blocks - len(self._free))

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go to the end of the queue
        (keeping their hash: they stay reusable until evicted)."""
        for b in blocks:
            if self._ref_cnt[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self._ref_cnt[b] -= 1
            if self._ref_cnt[b] == 0:
                self._free[b] = None

    def cache(self, block: int, block_hash: BlockHash) -> None:
        """Name a full block by its hash (no-op if another block already holds that content)."""
        if self._hash[block] is None and block_hash not in self.cached:
            self._hash[block] = block_hash
            self.cached[block_hash] = block

    def uncache(self, block: int) -> None:
        """Drop a block's name: its content was never written after all."""
        h = self._hash[block]
        if h is not None:
            del self.cached[h]
            self._hash[block] = None

    def ref_count(self, block: int) -> int:
        return self._ref_cnt[block]

    def block_hash(self, block: int) -> BlockHash | None:
        return self._hash[block]


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache at admission, and those found there."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Block tables of the running requests over one `BlockPool`, with prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: AttentionWindow | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self.block_tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}    # per request: its full blocks' chain
        self._num_cached: dict[str, int] = {}           # per request: blocks named so far
        self._released: dict[str, int] = {}             # per request: blocks released up to
        self._sink_blocks = 0 if window is None else -(-window.num_sink_tokens // block_size)
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests, 0.0 to 1.0 (cached free blocks count free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def peak_blocks(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a request of `num_tokens` tokens in all holds at once, computing
        at most `max_step_tokens` of them a step: all of them, or with a sliding window its
        sinks' blocks and those spanning its window and one step."""
        need = self.blocks_for(num_tokens)
        if self.window is None:
            return need
        span = -(-(self.window.size - 1 + max_step_tokens) // self.block_size) + 1
        return min(need, self._sink_blocks + span)

    # ----- prefix cache ------------------------------------------------------------------------
    def find_cached_prefix(self, req: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens, in order. At least
        one token is always left to compute (its logits are needed); requests that want prompt
        logprobs compute their whole prompt."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[int] = []
        chain = self._block_hashes(req, max_blocks)
        for i in range(max_blocks):
            block = self.pool.cached.get(chain[i])
            if block is None:
                break
            hits.append(block)
        return hits

    def _block_hashes(self, req: Request, n: int) -> list[BlockHash]:
        """The request's hash chain, extended to at least its first `n` full blocks (the
        list itself: it may hold more)."""
        chain = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        while len(chain) < n:
            i = len(chain)
            chain.append(hash_block(chain[-1] if chain else None,
                                    req.token_ids_slice(i * bs, (i + 1) * bs), req.cache_key))
        return chain

    # ----- allocation --------------------------------------------------------------------------
    def has_room(self, req_id: str, num_tokens: int) -> bool:
        """Whether the request's table already holds `num_tokens` tokens and no block among
        them is left to name in the prefix cache: `allocate_slots` would change nothing."""
        table = self.block_tables.get(req_id)
        return (table is not None and num_tokens <= len(table) * self.block_size
                and (not self.enable_prefix_caching
                     or num_tokens // self.block_size <= self._num_cached.get(req_id, 0)))

    def allocate_slots(self, req: Request, num_tokens: int,
                       cached_blocks: list[int] | None = None) -> list[int] | None:
        """Grow the request's block table to hold `num_tokens` tokens in all, starting from
        `cached_blocks` (prefix-cache hits) for a request that holds none yet.

        Returns the whole table, or None (and changes nothing) when the pool is short. The
        full blocks among the first `num_tokens` tokens are named in the prefix cache, but
        for a block that ends in a token still being sampled (async scheduling) the naming
        waits for a later call, once that token is known.
        """
        if not cached_blocks and self.has_room(req.request_id, num_tokens):
            return self.block_tables[req.request_id]    # the last block has room, none fills
        table = self.block_tables.get(req.request_id, [])
        known = min(num_tokens, req.num_tokens)     # tokens in flight have no id to hash yet
        hits = cached_blocks or []
        if hits and table:
            raise RuntimeError(f"{req.request_id} already holds blocks; hits only at admission")
        need = self.blocks_for(num_tokens) - len(table) - len(hits)
        reclaimed = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        if need + reclaimed > self.pool.num_free_blocks:
            return None
        self.pool.touch(hits)
        table = self.block_tables.setdefault(req.request_id, table)
        table.extend(hits)
        if need > 0:
            table.extend(self.pool.allocate(need))
        if self.enable_prefix_caching:
            self._name_full_blocks(req, table, known)
        return table

    def _name_full_blocks(self, req: Request, table: list[int], num_tokens: int) -> None:
        full = num_tokens // self.block_size
        start = self._num_cached.get(req.request_id, 0)
        if full <= start:
            return
        chain = self._block_hashes(req, full)
        for i in range(start, full):
            if table[i] != NULL_BLOCK:
                self.pool.cache(table[i], chain[i])
        self._num_cached[req.request_id] = full

    def release_outside_window(self, req_id: str, num_computed_tokens: int) -> int:
        """Give back the request's blocks that no query from position `num_computed_tokens`
        on can see (none without a window): those after its sinks' blocks and wholly before
        that query's window. Returns how many went back.

        Safe however far the scheduler has run ahead: a step already submitted reads them
        before any later step, the only kind that can be handed them, writes them."""
        window, table = self.window, self.block_tables.get(req_id)
        if window is None or table is None:
            return 0
        end = window.first_visible(num_computed_tokens) // self.block_size
        start = self._released.get(req_id, self._sink_blocks)
        if end <= start:
            return 0
        blocks = table[start:end]
        table[start:end] = [NULL_BLOCK] * (end - start)     # in place: the runner holds it
        self.pool.free(blocks[::-1])
        self._released[req_id] = end
        return end - start

    def free(self, req_id: str) -> None:
        """Give back every block of the request (no-op for a request holding none)."""
        table = self.block_tables.pop(req_id, None)
        self._num_cached.pop(req_id, None)
        released = self._released.pop(req_id, 0)
        if table:
            self.pool.free([b for b in reversed(table) if b != NULL_BLOCK] if released
                           else table[::-1])

    def free_uncomputed(self, req_id: str, num_computed_tokens: int) -> None:
        """Give back the blocks of a request taken out of a step before it ran: the blocks
        that step would have filled lose their names first, since their KV was never
        written (any other holder of them was scheduled to share the same failed step)."""
        table = self.block_tables.get(req_id, [])
        for i in range(num_computed_tokens // self.block_size,
                       self._num_cached.get(req_id, 0)):
            self.pool.uncache(table[i])
        self.free(req_id)

    def forget(self, req_id: str) -> None:
        """Drop the request's hash chain (it finished: its tokens will not be hashed again)."""
        self._hashes.pop(req_id, None)
