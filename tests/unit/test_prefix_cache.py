"""Prefix caching: the hash chain, hits at admission, LRU eviction, preemption, siblings —
exact block ids and ref counts (no torch)."""
from __future__ import annotations

from taskloom.engine.kv_cache import KVCacheManager, hash_block
from taskloom.engine.outputs import RunnerOutput
from taskloom.engine.request import Request
from taskloom.sampling_params import SamplingParams
from tests.unit.test_scheduler import assert_pool_full, make_scheduler, shares, step


def req(rid: str, prompt: list[int], max_tokens: int = 2, salt: str | None = None,
        **kw) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=(0,), cache_salt=salt)


P10 = list(range(1, 11))      # 10 tokens: two full blocks of 4 and a partial one


def run_to_end(s) -> None:
    while s.has_unfinished:
        step(s)


def test_hash_chain() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4]) and len(a) == 16
    assert a != hash_block(None, [1, 2, 4, 3])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(a, [5, 6, 7, 8], extra_key="lora-1")
    assert hash_block(None, [1]) != hash_block(None, [1], extra_key="")


def test_second_request_in_the_same_step_shares_full_blocks() -> None:
    s = make_scheduler(prefix_caching=True)
    s.add_request(req("a", P10))
    s.add_request(req("b", P10))
    out = step(s)
    assert shares(out) == [("a", 0, 10), ("b", 8, 2)]
    tables = s.kv.block_tables
    assert tables["a"] == [0, 1, 2] and tables["b"] == [0, 1, 3]
    assert [s.kv.pool.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    assert (s.kv.stats.queries, s.kv.stats.hits) == (20, 8)
    run_to_end(s)
    assert_pool_full(s)


def test_blocks_stay_cached_after_finish_until_evicted_lru() -> None:
    s = make_scheduler(num_blocks=6, prefix_caching=True)
    d_prompt = list(range(100, 112))
    s.add_request(req("a", P10, max_tokens=1))
    step(s)                                  # a: [0, 1, 2] named 0, 1; freed: 3 4 5 2 1 0
    assert_pool_full(s)
    s.add_request(req("c", P10, max_tokens=1))
    out = step(s)                            # hits 0, 1; block 3 from the front
    assert shares(out) == [("c", 8, 2)] and s.kv.stats.hits == 8
    assert_pool_full(s)                      # freed 3 1 0: queue 4 5 2 3 1 0
    s.add_request(req("d", d_prompt, max_tokens=1))
    step(s)                                  # d: [4, 5, 2]; queue 3 1 0 2 5 4
    assert s.kv.find_cached_prefix(req("a?", P10)) == [0, 1]
    s.add_request(req("e", list(range(200, 216)), max_tokens=1))
    step(s)                                  # e takes 3 1 0 2: a's prefix is evicted
    assert s.kv.find_cached_prefix(req("a?", P10)) == []
    assert s.kv.find_cached_prefix(req("d?", d_prompt)) == [4, 5]
    assert_pool_full(s)


def test_exact_lru_eviction_order() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    x, y = req("x", [1, 2, 3, 4, 5]), req("y", [7, 8, 9, 10, 11])
    assert kv.allocate_slots(x, 5) == [0, 1, 2]
    kv.free("x")                          # queue: 3 2 1 0 (x's tail first)
    assert kv.allocate_slots(y, 5) == [3, 2, 1]   # evicts x's block 1 (tokens 3, 4)
    assert kv.pool.block_hash(0) is not None      # x's first block survives
    assert kv.find_cached_prefix(req("x2", [1, 2, 3, 4, 5])) == [0]
    kv.free("y")
    assert_no_leak(kv)


def assert_no_leak(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.num_blocks and not kv.block_tables


def test_at_least_one_token_is_computed() -> None:
    s = make_scheduler(prefix_caching=True)
    s.add_request(req("a", list(range(1, 9))))       # 8 tokens: exactly two blocks
    step(s)
    s.add_request(req("b", list(range(1, 9))))
    out = step(s)
    assert ("b", 4, 4) in shares(out)                # one block hit, the last recomputed
    run_to_end(s)
    assert_pool_full(s)


def test_prompt_logprobs_and_salt_and_disabled_never_hit() -> None:
    s = make_scheduler(prefix_caching=True)
    s.add_request(req("a", P10))
    step(s)
    s.add_request(req("lp", P10, prompt_logprobs=1))
    s.add_request(req("salted", P10, salt="adapter-7"))
    out = step(s)
    assert ("lp", 0, 10) in shares(out) and ("salted", 0, 10) in shares(out)
    run_to_end(s)
    assert_pool_full(s)
    off = make_scheduler(prefix_caching=False)
    off.add_request(req("a", P10))
    off.add_request(req("b", P10))
    assert shares(step(off)) == [("a", 0, 10), ("b", 0, 10)]
    run_to_end(off)
    assert_pool_full(off)


def test_blocks_filled_by_decode_are_cached() -> None:
    s = make_scheduler(prefix_caching=True)
    a = req("a", [1, 2, 3, 4, 5, 6], max_tokens=4)
    s.add_request(a)
    for _ in range(3):
        step(s, token=9)        # computes 6, then 7, then 8 tokens: block 1 = [5, 6, 9, 9]
    assert a.num_computed_tokens == 8
    follow_up = [1, 2, 3, 4, 5, 6, 9, 9, 42]
    s.add_request(req("b", follow_up))
    out = step(s)
    assert ("b", 8, 1) in shares(out)
    run_to_end(s)
    assert_pool_full(s)


def test_preempted_request_resumes_from_its_cached_blocks() -> None:
    s = make_scheduler(num_blocks=5, prefix_caching=True, budget=32)
    s.add_request(req("a", P10, max_tokens=3))
    s.add_request(req("b", list(range(50, 58)), max_tokens=8))
    step(s)                                  # a: [0, 1, 2], b: [3, 4] (both named)
    step(s)                                  # b needs a third block: b is preempted
    assert s.num_preemptions == 1 and s.waiting[0].request_id == "b"
    step(s)                                  # a finishes; b cannot come back yet
    out = step(s)                            # b: its own blocks 3, 4 back, 1 token to do
    assert shares(out) == [("b", 8, 1)] and s.kv.block_tables["b"] == [3, 4, 2]
    assert s.kv.stats.hits == 8
    run_to_end(s)
    assert_pool_full(s)


def test_update_after_abort_mid_step_keeps_counts() -> None:
    s = make_scheduler(prefix_caching=True)
    s.add_request(req("a", P10))
    s.add_request(req("b", P10))
    out = s.schedule()
    s.finish_requests(["a"], s.requests["a"].status.__class__.FINISHED_ABORTED)
    s.update(out, RunnerOutput(sampled={"a": 9, "b": 9}))
    assert s.kv.block_tables["b"] == [0, 1, 3]
    assert [s.kv.pool.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    run_to_end(s)
    assert_pool_full(s)


def test_prefix_grouped_order_is_the_trie_walk() -> None:
    from taskloom.engine.prefix_order import prefix_grouped_order
    prompts = [[5, 1, 2], [3, 9], [5, 1, 1], [3, 9, 4], [5, 2], [3, 9]]
    order = prefix_grouped_order(prompts)
    assert order == [1, 5, 3, 2, 0, 4]
    assert [prompts[i][:1] for i in order] == [[3], [3], [3], [5], [5], [5]]


def test_decode_grows_the_table_and_names_blocks_exactly_at_block_boundaries() -> None:
    s = make_scheduler(prefix_caching=True)     # blocks of 4
    a = req("a", [1, 2, 3, 4, 5], max_tokens=8)
    s.add_request(a)
    seen = []
    while s.has_unfinished:
        out = step(s, token=9)
        seen.append((out.seqs[0].num_computed_tokens + len(out.seqs[0].token_ids),
                     len(out.seqs[0].block_ids), len(s.kv.pool.cached)))
    # (tokens in the cache after the step, blocks held, blocks named): a block is named the
    # step its last token is computed, a new block taken the step its first token is.
    assert seen == [(5, 2, 1), (6, 2, 1), (7, 2, 1), (8, 2, 2), (9, 3, 2), (10, 3, 2),
                    (11, 3, 2), (12, 3, 3)]
    assert_pool_full(s)
