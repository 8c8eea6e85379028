"""Sliding-window KV compression in the block accounting: which blocks go back to the pool
as requests advance, exact block ids, and the pool full again after every run (no torch)."""
from __future__ import annotations

import pytest

from taskloom.config import AttentionWindow, CacheConfig, SchedulerConfig, resolve_window
from taskloom.engine.kv_cache import NULL_BLOCK, KVCacheManager
from taskloom.engine.outputs import RunnerOutput
from taskloom.engine.scheduler import Scheduler

from test_scheduler import assert_pool_full, req, step


def windowed(num_blocks: int, window: AttentionWindow, budget: int = 8,
             prefix_caching: bool = False, async_scheduling: bool = False) -> Scheduler:
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=prefix_caching, window=window)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                             async_scheduling=async_scheduling)
    return Scheduler(config, kv, max_model_len=256)


def test_blocks_behind_the_window_go_back_after_each_step_and_sinks_stay() -> None:
    # Blocks of 4; queries see the last 6 positions and the first 2 (block 0 holds the sinks).
    s = windowed(16, AttentionWindow(6, 2))
    s.add_request(req("a", 20, max_tokens=8))
    step(s)                                    # prompt [0, 8): the next query, 8, sees 3..8
    assert s.kv.block_tables["a"] == [0, 1]
    step(s)                                    # [8, 16): query 16 sees 11..16, not block 1
    assert s.kv.block_tables["a"] == [0, NULL_BLOCK, 2, 3]
    assert s.kv.num_free_blocks == 16 - 3
    step(s)                                    # [16, 20) + first token: query 20 sees 15..20
    assert s.kv.block_tables["a"] == [0, NULL_BLOCK, NULL_BLOCK, 3, 4]
    for _ in range(7):
        step(s)
        table = s.kv.block_tables.get("a")
        if table is not None:   # sink block, then at most the window's two or three blocks
            assert len([b for b in table if b != NULL_BLOCK]) <= 1 + 3
    assert not s.has_unfinished
    assert_pool_full(s)


def test_a_request_longer_than_the_pool_runs_within_its_window() -> None:
    window = AttentionWindow(8, 4)
    s = windowed(6, window)
    assert s.kv.peak_blocks(200, 8) == 1 + 5
    long = req("long", 40, max_tokens=100)     # 140 tokens: 35 blocks without a window
    s.add_request(long)
    while s.has_unfinished:
        step(s)
    assert len(long.output_token_ids) == 100 and s.num_preemptions == 0
    assert_pool_full(s)
    plain = Scheduler(SchedulerConfig(max_num_batched_tokens=8), KVCacheManager(6, 4), 256)
    with pytest.raises(ValueError, match="needs 35 blocks"):
        plain.add_request(req("long", 40, max_tokens=100))
    with pytest.raises(ValueError, match="needs 7 blocks .* within its sliding window"):
        windowed(6, AttentionWindow(12, 4)).add_request(req("long", 40, max_tokens=100))


def test_preemption_and_abort_give_back_what_is_left() -> None:
    s = windowed(5, AttentionWindow(6, 0))
    s.add_request(req("a", 30, max_tokens=40))
    s.add_request(req("b", 30, max_tokens=40))
    preempted = False
    for _ in range(12):
        step(s)
        preempted |= s.num_preemptions > 0
    assert preempted and any(NULL_BLOCK in t for t in s.kv.block_tables.values())
    s.finish_requests(["a", "b"], s.requests["a"].status.FINISHED_ABORTED)
    assert_pool_full(s)


def test_released_blocks_stay_named_and_a_later_prompt_reuses_them() -> None:
    s = windowed(32, AttentionWindow(4, 0), prefix_caching=True)
    s.add_request(req("a", 16, max_tokens=2))
    step(s)
    step(s)
    assert s.kv.block_tables["a"][:2] == [NULL_BLOCK, NULL_BLOCK]
    while s.has_unfinished:
        step(s)
    s.add_request(req("b", 16, max_tokens=2))
    out = step(s)
    assert (out.seqs[0].num_computed_tokens, len(out.seqs[0].token_ids)) == (12, 4)
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_async_steps_release_behind_the_in_flight_tokens() -> None:
    """Scheduled ahead of its result, a request's placeholder token may end a block the
    window has passed (window 1): that block is released unnamed, and nothing breaks."""
    s = windowed(16, AttentionWindow(1, 0), prefix_caching=True, async_scheduling=True)
    a = req("a", 7, max_tokens=6)
    s.add_request(a)
    prev = s.schedule()
    while s.has_unfinished:
        nxt = s.schedule()
        s.update(prev, RunnerOutput(sampled={q.req_id: 9 for q in prev.seqs if q.sample}))
        prev = nxt
    s.update(prev, RunnerOutput(sampled={}))
    assert len(a.output_token_ids) == 6
    assert_pool_full(s)


def test_resolve_window() -> None:
    assert resolve_window(CacheConfig(), None, 4096) is None
    assert resolve_window(CacheConfig(), 4096, 32768) == AttentionWindow(4096, 0)
    assert resolve_window(CacheConfig(sliding_window=512, num_sink_tokens=4), 4096,
                          32768) == AttentionWindow(512, 4)
    assert resolve_window(CacheConfig(), 4096, 4096) is None     # the window holds it all
    with pytest.raises(ValueError, match="needs a sliding window"):
        resolve_window(CacheConfig(num_sink_tokens=4), None, 4096)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        CacheConfig(sliding_window=0)
