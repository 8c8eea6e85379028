"""Async scheduling in the scheduler: step N+1 is scheduled before step N's tokens are known.

Exact decisions: placeholder inputs, computed tokens counted at scheduling, no step past
max_tokens, preemption with a token in flight, prefix-cache naming deferred until the token
that fills a block is known, stale results of an aborted id. No torch.
"""
from __future__ import annotations

from taskloom.engine.kv_cache import hash_block
from taskloom.engine.outputs import PLACEHOLDER_TOKEN_ID as PH
from taskloom.engine.outputs import RunnerOutput, SchedulerOutput
from taskloom.engine.request import RequestStatus
from tests.unit.test_scheduler import assert_pool_full, make_scheduler, req, shares


def sampled(out: SchedulerOutput, token: int) -> RunnerOutput:
    return RunnerOutput(sampled={q.req_id: token for q in out.seqs if q.sample})


def inputs(out: SchedulerOutput) -> list[tuple[str, int, list[int], bool]]:
    return [(q.req_id, q.num_computed_tokens, q.token_ids, q.sample) for q in out.seqs]


def test_next_step_takes_the_token_in_flight_as_a_placeholder() -> None:
    s = make_scheduler(budget=6)
    s.add_request(req("a", 8, max_tokens=3))
    s1 = s.schedule()                              # prefill chunk: nothing sampled
    assert inputs(s1) == [("a", 0, [1, 2, 3, 4, 5, 6], False)]
    s2 = s.schedule()                              # the rest of the prompt, samples
    assert inputs(s2) == [("a", 6, [7, 8], True)]
    s.update(s1, RunnerOutput())
    s3 = s.schedule()                              # s2 still in flight
    assert inputs(s3) == [("a", 8, [PH], True)]
    r = s.requests["a"]
    assert (r.num_computed_tokens, r.num_output_placeholders, r.output_token_ids) == (9, 2, [])
    s.update(s2, sampled(s2, 41))
    assert (r.num_output_placeholders, r.output_token_ids) == (1, [41])
    s4 = s.schedule()                              # the third token is s3's: the last
    assert inputs(s4) == [("a", 9, [PH], True)]
    assert s.schedule().seqs == []                 # max_tokens 3 reached by tokens in flight
    s.update(s3, sampled(s3, 42))
    s.update(s4, sampled(s4, 43))
    assert r.output_token_ids == [41, 42, 43] and r.status == RequestStatus.FINISHED_LENGTH
    assert not s.has_unfinished
    assert_pool_full(s)


def test_a_stop_token_in_flight_wastes_one_step_only() -> None:
    s = make_scheduler()
    s.add_request(req("a", 3, max_tokens=10))
    s1 = s.schedule()
    s2 = s.schedule()
    s.update(s1, sampled(s1, 0))                   # eos: finished, blocks freed
    assert s.requests.get("a") is None and s.kv.num_free_blocks == s.kv.num_blocks
    s.update(s2, sampled(s2, 7))                   # the wasted step's token is dropped
    assert s.schedule().finished_req_ids == ["a"]
    assert_pool_full(s)


def test_preempted_with_a_token_in_flight_keeps_it_and_waits_for_it() -> None:
    # 3 blocks of 4: a (4 prompt) and b (4 prompt) each need a second block on decode.
    s = make_scheduler(num_blocks=3, block_size=4)
    s.add_request(req("a", 4, max_tokens=4))
    s.add_request(req("b", 4, max_tokens=4))
    s1 = s.schedule()
    assert shares(s1) == [("a", 0, 4), ("b", 0, 4)]
    s2 = s.schedule()                              # a gets block 2, b is preempted
    assert inputs(s2) == [("a", 4, [PH], True)]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_output_placeholders == 1
    s3 = s.schedule()                              # a's token in flight; b not readmitted
    assert [q.req_id for q in s3.seqs] == ["a"] and b.status == RequestStatus.PREEMPTED
    s.update(s1, sampled(s1, 50))
    assert b.output_token_ids == [50] and b.num_output_placeholders == 0
    s.update(s2, sampled(s2, 60))
    s.update(s3, sampled(s3, 61))
    s4 = s.schedule()
    s.update(s4, sampled(s4, 62))                  # a's fourth token: it finishes
    assert s.requests.get("a") is None
    s5 = s.schedule()                              # b recomputes its prompt and token 50
    assert inputs(s5) == [("b", 0, [1, 2, 3, 4, 50], True)]
    assert s5.new_requests == [] and s5.finished_req_ids == ["a"]
    s.update(s5, sampled(s5, 70))
    while s.has_unfinished:
        out = s.schedule()
        s.update(out, sampled(out, 71))
    assert b.output_token_ids == [50, 70, 71, 71]
    assert_pool_full(s)


def test_a_block_filled_by_a_token_in_flight_is_named_once_it_is_known() -> None:
    s = make_scheduler(block_size=4, prefix_caching=True)
    s.add_request(req("a", 3, max_tokens=4))
    s1 = s.schedule()                              # positions 0-2: block 0 not full
    s2 = s.schedule()                              # position 3 = s1's token: fills block 0
    assert inputs(s2) == [("a", 3, [PH], True)]
    block0 = s.kv.block_tables["a"][0]
    assert s.kv.pool.block_hash(block0) is None    # its last token has no id yet
    s.update(s1, sampled(s1, 30))
    s3 = s.schedule()
    expected = hash_block(None, [1, 2, 3, 30])
    assert s.kv.pool.block_hash(block0) == expected and s.kv.pool.cached[expected] == block0
    for out, token in ((s2, 31), (s3, 32)):
        s.update(out, sampled(out, token))
    while s.has_unfinished:
        out = s.schedule()
        s.update(out, sampled(out, 33))
    assert_pool_full(s)


def test_a_stale_result_never_reaches_a_new_request_with_the_same_id() -> None:
    s = make_scheduler()
    s.add_request(req("x", 3, max_tokens=2))
    s1 = s.schedule()
    s.finish_requests(["x"], RequestStatus.FINISHED_ABORTED)
    s.add_request(req("x", 5, max_tokens=2))
    s.update(s1, sampled(s1, 99))                  # the aborted x's token
    assert s.requests["x"].output_token_ids == []
    s2 = s.schedule()
    assert s2.finished_req_ids == ["x"] and inputs(s2) == [("x", 0, [1, 2, 3, 4, 5], True)]
    s.update(s2, sampled(s2, 5))
    out = s.schedule()
    s.update(out, sampled(out, 6))
    assert not s.has_unfinished
    assert_pool_full(s)


def test_a_seat_whose_last_token_is_in_flight_goes_to_a_waiting_request() -> None:
    """A request whose last token is in flight is not scheduled again: the step being
    scheduled admits a waiting request in its seat (max_num_seqs counts the sequences a step
    can run), rather than running one sequence short while the token is on its way."""
    s = make_scheduler(max_num_seqs=2)
    for rid, max_tokens in (("a", 2), ("b", 5), ("c", 3)):
        s.add_request(req(rid, 3, max_tokens=max_tokens))
    s1 = s.schedule()
    assert [q.req_id for q in s1.seqs] == ["a", "b"]
    s2 = s.schedule()                              # a's second (last) token: in flight
    assert [q.req_id for q in s2.seqs] == ["a", "b"]
    s.update(s1, sampled(s1, 10))
    s3 = s.schedule()                              # a waits for s2's token: c takes its seat
    assert inputs(s3) == [("b", 4, [PH], True), ("c", 0, [1, 2, 3], True)]
    assert s.requests["a"].status == RequestStatus.RUNNING
    s.update(s2, sampled(s2, 11))                  # a finishes
    assert s.requests.get("a") is None
    s4 = s.schedule()
    assert [q.req_id for q in s4.seqs] == ["b", "c"] and s4.finished_req_ids == ["a"]
    for out in (s3, s4):
        s.update(out, sampled(out, 12))
    while s.has_unfinished:
        out = s.schedule()
        assert len(out.seqs) <= 2
        s.update(out, sampled(out, 13))
    assert_pool_full(s)
