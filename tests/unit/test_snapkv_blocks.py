"""SnapKV in the scheduler and the block accounting: how a compressed prompt is chunked, the
blocks its kept entries get and those it gives back, exact ids, the prefix cache, preemption,
and the pool full again after every run (no torch)."""
from __future__ import annotations

import pytest

from taskloom.config import (CacheConfig, EngineConfig, SchedulerConfig, SnapKVConfig,
                             resolve_window)
from taskloom.engine.kv_cache import NULL_BLOCK, KVCacheManager
from taskloom.engine.outputs import KVCompression, RunnerOutput
from taskloom.engine.request import RequestStatus
from taskloom.engine.scheduler import Scheduler

from test_scheduler import assert_pool_full, req, shares, step


def snap(num_blocks: int = 32, budget: int = 8, window: int = 4, step_budget: int = 8,
         prefix_caching: bool = False, async_scheduling: bool = False) -> Scheduler:
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=prefix_caching,
                        snapkv=SnapKVConfig(budget, window_size=window))
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=step_budget,
                             async_scheduling=async_scheduling)
    return Scheduler(config, kv, max_model_len=256)


def test_the_last_chunk_holds_the_window_and_the_kept_entries_replace_the_prompt() -> None:
    s = snap()
    s.add_request(req("a", 18, max_tokens=3))
    assert shares(step(s)) == [("a", 0, 8)]
    # [8, 16) would leave 2 prompt tokens, fewer than the observation window's 4
    out = step(s)
    assert shares(out) == [("a", 8, 6)] and out.seqs[0].compress is None
    out = step(s)
    assert shares(out) == [("a", 14, 4)]
    # positions 10 .. 17 are kept: blocks 2, 3 and 4 of the table, fresh ones
    assert out.seqs[0].compress == KVCompression(18, 10, [5, 6, 7])
    assert out.seqs[0].block_ids == [0, 1, 2, 3, 4] and out.seqs[0].kv_start == 0
    assert s.kv.num_free_blocks == 32 - 8
    out = step(s)                               # the next schedule puts them in the table
    assert s.kv.block_tables["a"] == [NULL_BLOCK, NULL_BLOCK, 5, 6, 7]
    assert out.seqs[0].block_ids == [NULL_BLOCK, NULL_BLOCK, 5, 6, 7]
    assert out.seqs[0].kv_start == 10 and out.seqs[0].compress is None
    assert s.kv.num_free_blocks == 32 - 3 and s.kv.num_compressed == 1
    step(s)
    assert not s.has_unfinished
    assert_pool_full(s)


def test_prompts_within_the_budget_are_not_touched() -> None:
    s = snap(budget=20)
    s.add_request(req("a", 20, max_tokens=2))
    outs = [step(s) for _ in range(4)]
    assert all(q.compress is None and q.kv_start == 0 for o in outs for q in o.seqs)
    assert s.kv.num_compressed == 0
    assert_pool_full(s)


def test_a_whole_prompt_in_one_step_and_a_request_that_ends_with_it() -> None:
    s = snap(step_budget=64)
    s.add_request(req("a", 30, max_tokens=1))
    out = step(s)
    # 8 blocks for the prompt, then positions 22 .. 29: blocks 5, 6, 7 of the table
    assert out.seqs[0].compress == KVCompression(30, 22, [8, 9, 10])
    assert not s.has_unfinished                 # it finished: the kept blocks go back too
    assert_pool_full(s)


def test_a_request_longer_than_the_pool_fits_once_compressed() -> None:
    s = snap(num_blocks=12)
    # 40 prompt tokens, then 40 more: 20 blocks in all, but 10 + 2 at the compressing step
    # and then blocks 8 onwards only
    assert s.kv.peak_blocks(80, 8, 40) == 12
    long = req("long", 40, max_tokens=40)
    s.add_request(long)
    while s.has_unfinished:
        step(s)
    assert len(long.output_token_ids) == 40 and s.num_preemptions == 0
    assert_pool_full(s)
    with pytest.raises(ValueError, match="needs 13 blocks"):
        snap(num_blocks=12).add_request(req("long", 40, max_tokens=44))


def test_prompt_blocks_stay_cached_and_a_later_request_recomputes_the_window() -> None:
    s = snap(prefix_caching=True, step_budget=64)
    s.add_request(req("a", 18, max_tokens=4))
    step(s)
    step(s)                                     # compressed: blocks 0 .. 4 are free, named
    assert s.kv.block_tables["a"] == [NULL_BLOCK, NULL_BLOCK, 5, 6, 7]
    s.add_request(req("b", 18, max_tokens=2))
    out = step(s)
    # b takes the full blocks before its window (positions 0 .. 11) from the cache and
    # computes 12 .. 17 itself, since SnapKV needs its window's queries
    assert ("b", 12, 6) in shares(out)
    assert s.kv.stats.hits == 12
    b = next(q for q in out.seqs if q.req_id == "b")
    assert b.block_ids == [0, 1, 2, 8, 9] and b.compress == KVCompression(18, 10, [10, 11, 12])
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_what_a_compressed_request_computes_is_not_named() -> None:
    s = snap(prefix_caching=True, step_budget=64)
    s.add_request(req("a", 18, max_tokens=12))
    while s.has_unfinished:
        step(s)
    named = {s.kv.pool.block_hash(b) for b in range(s.kv.num_blocks)} - {None}
    assert len(named) == 4                      # the prompt's full blocks, none after
    assert_pool_full(s)


def test_preemption_recomputes_and_compresses_again_at_the_prompt_end() -> None:
    s = snap(num_blocks=10, step_budget=64)
    s.add_request(req("b", 8, max_tokens=30))
    a = req("a", 18, max_tokens=20)
    s.add_request(a)        # admitted after b: the one preempted when blocks run out
    seen = []
    for _ in range(200):
        if not s.has_unfinished:
            break
        out = step(s)
        seen += [(q.req_id, q.num_computed_tokens, len(q.token_ids)) for q in out.seqs
                 if q.compress is not None]
    assert not s.has_unfinished and a.num_preemptions > 0
    # every time a's prompt is computed it ends a chunk and is compressed
    assert all(rid == "a" and start + n == 18 for rid, start, n in seen)
    assert len(seen) == 1 + a.num_preemptions and len(a.output_token_ids) == 20
    assert_pool_full(s)


def test_async_scheduling_swaps_the_table_for_the_next_step_only() -> None:
    s = snap(step_budget=64, async_scheduling=True)
    s.add_request(req("a", 18, max_tokens=3))
    first = s.schedule()
    assert first.seqs[0].compress is not None
    second = s.schedule()                       # scheduled before the first step's tokens
    assert first.seqs[0].block_ids == [0, 1, 2, 3, 4]
    assert second.seqs[0].block_ids == [NULL_BLOCK, NULL_BLOCK, 5, 6, 7]
    assert second.seqs[0].kv_start == 10
    s.update(first, RunnerOutput(sampled={"a": 9}))
    s.update(second, RunnerOutput(sampled={"a": 9}))
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_a_compressing_step_that_fails_drops_its_names_and_blocks() -> None:
    s = snap(prefix_caching=True, step_budget=64)
    s.add_request(req("a", 18, max_tokens=3))
    out = s.schedule()
    s.fail_scheduled(out, {"a"})
    assert not s.kv.pool.cached
    assert_pool_full(s)


def test_abort_while_compressed_gives_back_what_is_left() -> None:
    s = snap()
    s.add_request(req("a", 30, max_tokens=20))
    for _ in range(6):
        step(s)
    assert NULL_BLOCK in s.kv.block_tables["a"]
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert_pool_full(s)


def test_a_step_budget_below_the_window_waits_for_room() -> None:
    s = snap(step_budget=8)
    s.add_request(req("x", 5, max_tokens=8))
    s.add_request(req("a", 12, max_tokens=2))
    # x's prompt (5) leaves 3 tokens, and a's first chunk could take 3 of its 12: it may, as
    # its last chunk (8 .. 12) still holds the window
    assert shares(step(s)) == [("x", 0, 5), ("a", 0, 3)]
    out = step(s)       # x decodes (1), a takes 5 more: 3 .. 8, leaving its window of 4
    assert shares(out) == [("x", 5, 1), ("a", 3, 5)]
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="must exceed its window_size"):
        SnapKVConfig(32, window_size=32)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        SnapKVConfig(64, kernel_size=4)
    with pytest.raises(ValueError, match="pooling"):
        SnapKVConfig(64, pooling="median")
    with pytest.raises(ValueError, match="choose one KV compression"):
        CacheConfig(sliding_window=128, snapkv=SnapKVConfig(64))
    with pytest.raises(ValueError, match="model's own sliding window"):
        resolve_window(CacheConfig(snapkv=SnapKVConfig(64)), 4096, 32768)
    assert resolve_window(CacheConfig(snapkv=SnapKVConfig(64)), 4096, 4096) is None
    with pytest.raises(ValueError, match="exceeds max_num_batched_tokens"):
        EngineConfig(cache=CacheConfig(snapkv=SnapKVConfig(64, window_size=32)),
                     scheduler=SchedulerConfig(max_num_batched_tokens=16))
