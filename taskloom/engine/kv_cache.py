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

SnapKV (KV compression of long prompts, `SnapKVConfig`): the step that computes the last
chunk of a prompt longer than the budget is also given fresh blocks for the positions
`L - budget .. L - 1` (L: the prompt's length), and the runner writes the entries each KV
head keeps there (`KVCompression`). Once that step is submitted, `apply_compressions` puts
them in the table in place of the prompt's blocks, which go back to the pool still named in
the prefix cache (their KV was computed in full), and the table's places before them become
NULL_BLOCK. The request then holds about `budget` tokens of prompt KV; its queries read from
position `L - budget` on (`kv_start`), and nothing it computes after is named in the prefix
cache, since its KV depends on the compression.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from taskloom.config import AttentionWindow, SnapKVConfig
from taskloom.engine.outputs import KVCompression
from taskloom.engine.request import Request

BlockHash = bytes
# A block-table entry whose block went back to the pool: it lay wholly outside every later
# query's sliding window (see KVCacheManager.release_outside_window), or before a compressed
# prompt's kept entries (SnapKV). Nothing reads it.
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
                 window: AttentionWindow | None = None,
                 snapkv: SnapKVConfig | None = None) -> None:
        if window is not None and snapkv is not None:
            raise ValueError("snapkv does not run with a sliding window")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self.snapkv = snapkv
        self._compress_at: dict[str, int] = {}   # per request due to compress: its prompt length
        self._pending: dict[str, KVCompression] = {}    # scheduled, not yet in the table
        self._kv_start: dict[str, int] = {}      # per compressed request: first position held
        self.num_compressed = 0                  # prompts compressed so far
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

    def peak_blocks(self, num_tokens: int, max_step_tokens: int,
                    num_prompt_tokens: int | None = None) -> int:
        """The most blocks a request of `num_tokens` tokens in all holds at once, computing
        at most `max_step_tokens` of them a step: all of them; with a sliding window its
        sinks' blocks and those spanning its window and one step; with SnapKV, for a prompt
        of `num_prompt_tokens` it compresses, its prompt's and the kept entries' blocks at
        the step that compresses it, or the kept entries' and the outputs' after."""
        need = self.blocks_for(num_tokens)
        snapkv = self.snapkv
        if snapkv is not None and num_prompt_tokens is not None and \
                snapkv.compresses(num_prompt_tokens):
            first, dest = self._kept_blocks(num_prompt_tokens)
            return max(self.blocks_for(num_prompt_tokens) + dest, need - first)
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
        snapkv = self.snapkv
        if snapkv is not None and snapkv.compresses(req.num_prompt_tokens):
            # its observation window's queries must be computed, and nothing after the prompt
            # (computed over a compressed prompt) may be taken from another request
            max_blocks = min(max_blocks,
                             (req.num_prompt_tokens - snapkv.window_size) // self.block_size)
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
                     or num_tokens // self.block_size <= self._num_cached.get(req_id, 0)
                     or req_id in self._kv_start)
                and not (self._compress_at and num_tokens >= self._compress_at.get(
                    req_id, num_tokens + 1)))

    def allocate_slots(self, req: Request, num_tokens: int,
                       cached_blocks: list[int] | None = None) -> list[int] | None:
        """Grow the request's block table to hold `num_tokens` tokens in all, starting from
        `cached_blocks` (prefix-cache hits) for a request that holds none yet.

        Returns the whole table, or None (and changes nothing) when the pool is short. The
        full blocks among the first `num_tokens` tokens are named in the prefix cache, but
        for a block that ends in a token still being sampled (async scheduling) the naming
        waits for a later call, once that token is known. With SnapKV, the call that takes a
        prompt it compresses to its end also takes the blocks for the kept entries
        (`pending_compression`).
        """
        rid = req.request_id
        snapkv = self.snapkv
        if snapkv is not None and rid not in self.block_tables and \
                snapkv.compresses(req.num_prompt_tokens):
            self._compress_at[rid] = req.num_prompt_tokens
        if not cached_blocks and self.has_room(rid, num_tokens):
            return self.block_tables[rid]    # the last block has room, none fills
        table = self.block_tables.get(rid, [])
        known = min(num_tokens, req.num_tokens)     # tokens in flight have no id to hash yet
        hits = cached_blocks or []
        if hits and table:
            raise RuntimeError(f"{rid} already holds blocks; hits only at admission")
        need = self.blocks_for(num_tokens) - len(table) - len(hits)
        reclaimed = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        compress_at = self._compress_at.get(rid) if self._compress_at else None
        if compress_at is not None and num_tokens < compress_at:
            compress_at = None      # not this step
        kept = 0 if compress_at is None else self._kept_blocks(compress_at)[1]
        if need + reclaimed + kept > self.pool.num_free_blocks:
            return None
        self.pool.touch(hits)
        table = self.block_tables.setdefault(rid, table)
        table.extend(hits)
        if need > 0:
            table.extend(self.pool.allocate(need))
        if self.enable_prefix_caching:
            self._name_full_blocks(req, table, known)
        if compress_at is not None and snapkv is not None:
            if num_tokens != compress_at:
                raise RuntimeError(f"{rid}: a step that compresses a prompt must end with it "
                                   f"({compress_at} tokens), not at {num_tokens}")
            del self._compress_at[rid]
            self._pending[rid] = KVCompression(compress_at, compress_at - snapkv.budget,
                                               self.pool.allocate(kept))
        return table

    def _kept_blocks(self, num_prompt_tokens: int) -> tuple[int, int]:
        """For a prompt SnapKV compresses: the index of the first block of its kept entries
        (positions L - budget .. L - 1), and how many blocks they span."""
        assert self.snapkv is not None
        first = (num_prompt_tokens - self.snapkv.budget) // self.block_size
        return first, (num_prompt_tokens - 1) // self.block_size - first + 1

    def pending_compression(self, req_id: str) -> KVCompression | None:
        """The compression the request's step being scheduled carries, if it has one."""
        return self._pending.get(req_id) if self._pending else None

    def kv_start(self, req_id: str) -> int:
        """The first position whose KV the request holds (0 unless compressed)."""
        return self._kv_start.get(req_id, 0) if self._kv_start else 0

    def apply_compressions(self) -> int:
        """Put the kept entries of the compressions scheduled so far (steps already
        submitted: the runner copied their tables) in their requests' tables, and give the
        pool back the blocks they replace. Returns how many prompts were compressed.

        Safe however far the scheduler has run ahead: the submitted step that writes the
        kept entries reads the blocks it replaces before any later step, the only kind that
        can be handed them, writes them."""
        if not self._pending:
            return 0
        bs = self.block_size
        for rid, c in self._pending.items():
            table = self.block_tables[rid]
            first = c.first_position // bs
            if len(table) != first + len(c.block_ids):
                raise RuntimeError(f"{rid}: {len(table)} blocks at compression, expected "
                                   f"{first + len(c.block_ids)}")
            # a new list: the runner rewrites its row (the step in flight keeps the old one)
            self.block_tables[rid] = [NULL_BLOCK] * first + c.block_ids
            self.pool.free(table[::-1])
            self._kv_start[rid] = c.first_position
        n = len(self._pending)
        self.num_compressed += n
        self._pending = {}
        return n

    def _name_full_blocks(self, req: Request, table: list[int], num_tokens: int) -> None:
        if self._kv_start and req.request_id in self._kv_start:
            return      # compressed: its KV from here on is its own
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
        compressed = self._kv_start.pop(req_id, None) is not None
        self._compress_at.pop(req_id, None)
        pending = self._pending.pop(req_id, None)
        if pending is not None:
            self.pool.free(pending.block_ids[::-1])
        if table:
            self.pool.free([b for b in reversed(table) if b != NULL_BLOCK]
                           if released or compressed else table[::-1])

    def free_uncomputed(self, req_id: str, num_computed_tokens: int) -> None:
        """Give back the blocks of a request taken out of a step before it ran: the blocks
        that step would have filled lose their names first, since their KV was never
        written (any other holder of them was scheduled to share the same failed step)."""
        table = self.block_tables.get(req_id, [])
        for i in range(num_computed_tokens // self.block_size,
                       min(self._num_cached.get(req_id, 0), len(table))):
            if table[i] != NULL_BLOCK:
                self.pool.uncache(table[i])
        self.free(req_id)

    def forget(self, req_id: str) -> None:
        """Drop the request's hash chain (it finished: its tokens will not be hashed again)."""
        self._hashes.pop(req_id, None)
