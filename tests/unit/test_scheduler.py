"""Scheduler and block accounting: exact decisions, block ids and order (no torch)."""
from __future__ import annotations

import pytest

from taskloom.config import SchedulerConfig
from taskloom.engine.kv_cache import BlockPool, KVCacheManager
from taskloom.engine.outputs import RunnerOutput, SchedulerOutput
from taskloom.engine.request import Request, RequestStatus
from taskloom.engine.scheduler import Scheduler
from taskloom.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   budget: int = 64, max_model_len: int = 256,
                   prefix_caching: bool = False) -> Scheduler:
    """Prefix caching is off here: these requests share prompts on purpose, to test
    scheduling alone (tests/unit/test_prefix_cache.py tests it on)."""
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     kv, max_model_len)


def req(rid: str, n_prompt: int, max_tokens: int = 4, **kw) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=(0,))


def step(s: Scheduler, token: int = 9) -> SchedulerOutput:
    """One step with a runner that samples `token` for every sequence that samples."""
    out = s.schedule()
    s.update(out, RunnerOutput(sampled={q.req_id: token for q in out.seqs if q.sample}))
    return out


def shares(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(q.req_id, q.num_computed_tokens, len(q.token_ids)) for q in out.seqs]


def assert_pool_full(s: Scheduler) -> None:
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert not s.kv.block_tables
    assert all(s.kv.pool.ref_count(b) == 0 for b in range(s.kv.num_blocks))


def test_block_pool_hands_out_front_and_takes_back_at_end() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(1)
    assert (a, b) == ([0, 1], [2])
    pool.free(a[::-1])
    assert pool.allocate(3) == [3, 1, 0]
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([3, 3])


def test_allocate_slots_grows_table_and_refuses_without_side_effects() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    a, b = req("a", 12), req("b", 12)
    assert kv.allocate_slots(a, 5) == [0, 1]
    assert kv.allocate_slots(a, 8) == [0, 1]
    assert kv.allocate_slots(b, 8) is None
    assert "b" not in kv.block_tables and kv.num_free_blocks == 1
    assert kv.allocate_slots(a, 9) == [0, 1, 2]
    kv.free("a")
    assert kv.num_free_blocks == 3 and kv.pool.allocate(3) == [2, 1, 0]


def test_chunked_prefill_then_decode() -> None:
    s = make_scheduler(budget=8)
    s.add_request(req("a", 20, max_tokens=2))
    assert shares(step(s)) == [("a", 0, 8)]
    assert shares(step(s)) == [("a", 8, 8)]
    out = step(s)
    assert shares(out) == [("a", 16, 4)] and out.seqs[0].sample
    assert s.kv.block_tables["a"] == [0, 1, 2, 3, 4]
    out = step(s)  # decode of the first sampled token, samples the second: done (max_tokens)
    assert shares(out) == [("a", 20, 1)]
    assert not s.has_unfinished
    assert_pool_full(s)
    assert s.schedule().finished_req_ids == ["a"]


def test_prefill_chunks_and_decodes_share_a_step_fcfs() -> None:
    s = make_scheduler(budget=10)
    s.add_request(req("a", 6))
    s.add_request(req("b", 12))
    s.add_request(req("c", 3))
    assert shares(step(s)) == [("a", 0, 6), ("b", 0, 4)]
    assert shares(step(s)) == [("a", 6, 1), ("b", 4, 8), ("c", 0, 1)]
    assert shares(step(s)) == [("a", 7, 1), ("b", 12, 1), ("c", 1, 2)]
    assert shares(step(s)) == [("a", 8, 1), ("b", 13, 1), ("c", 3, 1)]
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_max_num_seqs_limits_admission() -> None:
    s = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 4))
    assert [q.req_id for q in step(s).seqs] == ["a", "b"]
    assert s.num_waiting == 1
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_preemption_of_latest_request_and_resume_by_recompute() -> None:
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens grow until the pool runs out.
    s = make_scheduler(num_blocks=6, block_size=4)
    a = req("a", 8, max_tokens=12)
    s.add_request(a)
    s.add_request(req("b", 8, max_tokens=12))
    assert shares(step(s)) == [("a", 0, 8), ("b", 0, 8)]
    for _ in range(4):  # positions 8..11 fill a third block each
        step(s)
    assert s.kv.num_free_blocks == 0
    out = step(s)  # 'a' needs a 4th block: 'b' (latest) is preempted
    assert shares(out) == [("a", 12, 1)]
    b = s.waiting[0]
    assert b.request_id == "b" and b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and s.num_preemptions == 1
    assert len(b.output_token_ids) == 5
    while a.status == RequestStatus.RUNNING:
        step(s)
    out = step(s)  # 'b' resumes: recomputes prompt + all but the newest output token
    assert shares(out) == [("b", 0, 13)] and out.seqs[0].sample
    assert out.new_requests == []  # the runner still knows 'b'
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_requests_that_can_never_fit_are_rejected_at_admission() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="context length is 64"):
        s.add_request(req("long", 64))
    with pytest.raises(ValueError, match="whole pool has 4 blocks"):
        s.add_request(req("big", 10, max_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        s.check_fits(0, 1)
    s.add_request(req("ok", 10, max_tokens=6))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("ok", 1))
    assert list(s.requests) == ["ok"]


def test_stop_conditions() -> None:
    s = make_scheduler(max_model_len=16)
    s.add_request(req("eos", 4, max_tokens=10))
    s.add_request(req("min", 4, max_tokens=10, min_tokens=3))
    s.add_request(req("stopid", 4, max_tokens=10, stop_token_ids=[5]))
    s.add_request(req("ctx", 9, max_tokens=None, ignore_eos=True))
    step(s, token=5)
    assert s.requests.keys() == {"eos", "min", "ctx"}
    step(s, token=0)
    assert s.requests.keys() == {"min", "ctx"}  # 'min' has only 2 tokens out
    step(s, token=0)
    assert s.requests.keys() == {"ctx"}
    while s.has_unfinished:
        step(s, token=1)
    assert_pool_full(s)


def test_finish_reasons_and_context_limit() -> None:
    s = make_scheduler(max_model_len=12)
    a, b = req("len", 4, max_tokens=2), req("ctx", 9, max_tokens=None)
    s.add_request(a)
    s.add_request(b)
    while s.has_unfinished:
        step(s, token=1)
    assert a.status == RequestStatus.FINISHED_LENGTH and len(a.output_token_ids) == 2
    assert b.status == RequestStatus.FINISHED_LENGTH and b.num_tokens == 12
    assert_pool_full(s)


@pytest.mark.parametrize("when,seen", [(0, []), (1, ["a"]), (2, ["a", "b"]), (5, ["a", "b"])])
def test_abort_at_any_moment_frees_every_block(when: int, seen: list[str]) -> None:
    s = make_scheduler(budget=8, max_num_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 12, max_tokens=6))
    for _ in range(when):
        step(s)
    s.finish_requests(["a", "b", "c"], RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished and not s.running and not s.waiting
    assert_pool_full(s)
    out = s.schedule()
    assert out.is_empty and sorted(out.finished_req_ids) == seen  # the runner drops them


def test_aborting_during_a_step_drops_its_result() -> None:
    s = make_scheduler()
    s.add_request(req("a", 4))
    out = s.schedule()
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.update(out, RunnerOutput(sampled={"a": 3})) == []
    assert_pool_full(s)
