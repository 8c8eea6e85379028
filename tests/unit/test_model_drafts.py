"""Drafts the model proposes for itself (Medusa) on the host: the runner's guesses reach the
next step of the same request, cut to the budget and to k, never stale (after preemption or
once the request moved on), never for a finished request; steps ask the runner for guesses
only with such a proposer. No torch: RunnerOutputs are written by hand."""
from __future__ import annotations

from taskloom.config import SchedulerConfig, SpeculativeConfig
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.model_drafts import ModelDraftProposer
from taskloom.engine.ngram import NgramProposer
from taskloom.engine.outputs import RunnerOutput
from taskloom.engine.request import Request, RequestStatus
from taskloom.engine.scheduler import Scheduler
from taskloom.sampling_params import SamplingParams

MEDUSA = SpeculativeConfig(method="medusa", model="/heads", num_speculative_tokens=3)


def scheduler(num_blocks: int = 32, proposer: object = None) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(num_blocks, 4),
                     128, proposer=proposer or ModelDraftProposer(MEDUSA))


def request(rid: str, max_tokens: int = 32, prompt: int = 6) -> Request:
    return Request(rid, list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens),
                   eos_token_ids=(0,))


def step(s: Scheduler, sampled: dict[str, int], accepted: dict[str, int] | None = None,
         drafts: dict[str, list[int]] | None = None) -> list:
    out = s.schedule()
    s.update(out, RunnerOutput(sampled=sampled, num_accepted=accepted or {},
                               draft_token_ids=drafts or {}))
    return out


def test_the_heads_guesses_are_the_next_steps_drafts() -> None:
    s = scheduler()
    a = request("a")
    s.add_request(a)
    first = step(s, {"a": 50}, drafts={"a": [51, 52, 53, 54]})    # prefill; k = 3 kept
    assert first.num_model_drafts == 3 and not first.seqs[0].draft_token_ids
    out = s.schedule()
    (seq,) = out.seqs
    assert list(seq.draft_token_ids) == [51, 52, 53] and seq.token_ids == [50, 51, 52, 53]
    assert out.num_scheduled_tokens == 4
    # two drafts kept, then the model's own token; the heads guess from there
    s.update(out, RunnerOutput(sampled={"a": 60}, num_accepted={"a": 2},
                               draft_token_ids={"a": [61, 62, 63]}))
    assert a.output_token_ids == [50, 51, 52, 60]
    assert a.num_computed_tokens == 6 + 3
    assert list(s.schedule().seqs[0].draft_token_ids) == [61, 62, 63]
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 3, 2)


def test_no_guesses_no_drafts_and_stale_guesses_are_dropped() -> None:
    s = scheduler()
    a = request("a")
    s.add_request(a)
    step(s, {"a": 50})                              # the runner guessed nothing
    out = step(s, {"a": 51}, drafts={"a": [7, 8, 9]})
    assert not out.seqs[0].draft_token_ids
    proposer = s.proposer
    assert isinstance(proposer, ModelDraftProposer)
    assert proposer.propose(a, 3) == [7, 8, 9]
    a.output_token_ids.append(52)                   # the request moved on since the guess
    assert proposer.propose(a, 3) == []


def test_drafts_are_cut_to_what_max_tokens_leaves() -> None:
    s = scheduler()
    a = request("a", max_tokens=3)
    s.add_request(a)
    step(s, {"a": 50}, drafts={"a": [51, 52, 53]})
    out = s.schedule()
    assert list(out.seqs[0].draft_token_ids) == [51]   # 1 output so far: room for 2 tokens


def test_finished_requests_leave_no_guesses_behind() -> None:
    s = scheduler()
    a, b = request("a", max_tokens=1), request("b")
    s.add_request(a)
    s.add_request(b)
    step(s, {"a": 50, "b": 50}, drafts={"a": [1, 2, 3], "b": [4, 5, 6]})
    assert a.status is RequestStatus.FINISHED_LENGTH
    out = s.schedule()
    s.update(out, RunnerOutput(sampled={"b": 0}, num_accepted={"b": 0},
                               draft_token_ids={"b": [7, 8, 9]}))    # EOS: b stops too
    assert b.status is RequestStatus.FINISHED_STOPPED
    assert s.proposer.num_requests == 0
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_a_preempted_request_is_computed_again_before_it_drafts() -> None:
    """Its recomputed context is one chunk, which samples and brings fresh guesses."""
    s = scheduler()
    a = request("a")
    s.add_request(a)
    step(s, {"a": 50}, drafts={"a": [1, 2, 3]})
    s.running.remove(a)
    s._preempt(a)                      # as a step short of blocks would
    out = step(s, {"a": 60}, drafts={"a": [61, 62, 63]})
    (seq,) = out.seqs
    assert not seq.draft_token_ids and seq.num_computed_tokens + len(seq.token_ids) == 7
    assert list(s.schedule().seqs[0].draft_token_ids) == [61, 62, 63]


def test_a_step_that_loses_requests_still_asks_for_guesses() -> None:
    """An adapter that could not be loaded takes its requests out of the step; the others
    still get their guesses."""
    s = scheduler()
    a, b = request("a"), request("b")
    s.add_request(a)
    s.add_request(b)
    out = s.fail_scheduled(s.schedule(), {"b"})
    assert [q.req_id for q in out.seqs] == ["a"] and out.num_model_drafts == 3
    s.update(out, RunnerOutput(sampled={"a": 50}, draft_token_ids={"a": [1, 2, 3]}))
    assert b.status is RequestStatus.FINISHED_ERROR
    assert list(s.schedule().seqs[0].draft_token_ids) == [1, 2, 3]


def test_only_a_model_proposer_asks_the_runner_for_guesses() -> None:
    ngram = scheduler(proposer=NgramProposer(SpeculativeConfig(num_speculative_tokens=3)))
    ngram.add_request(request("a"))
    assert ngram.schedule().num_model_drafts == 0
    s = scheduler()
    s.add_request(request("a"))
    s.proposer = None                 # bench spec's run without drafts
    assert s.schedule().num_model_drafts == 0
