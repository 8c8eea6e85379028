"""Speculative decoding on the host: prompt-lookup drafts (exact proposals, against a brute
force search) and the scheduler's draft accounting (tokens, budget, blocks, acceptance,
stops). No torch: the runner's part is played by hand-made RunnerOutputs."""
from __future__ import annotations

import random

import pytest

from taskloom.config import SchedulerConfig, SpeculativeConfig
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.ngram import NgramProposer
from taskloom.engine.outputs import RunnerOutput, SchedulerOutput
from taskloom.engine.request import Request, RequestStatus
from taskloom.engine.scheduler import Scheduler
from taskloom.sampling_params import SamplingParams


def proposer(k: int = 4, min_n: int = 2, max_n: int = 3) -> NgramProposer:
    return NgramProposer(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=min_n,
                                           prompt_lookup_max=max_n))


def request(tokens: list[int], rid: str = "r", max_tokens: int | None = 16,
            **kw: object) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=(0,))


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The longest suffix n-gram's latest earlier occurrence, and what followed it."""
    end = len(tokens)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        suffix = tokens[end - n:]
        for j in range(end - 1, n - 1, -1):
            if tokens[j - n:j] == suffix:
                return tokens[j:j + k]
    return []


@pytest.mark.parametrize(("tokens", "expected"), [
    ([1, 2, 3, 4, 9, 1, 2, 3], [4, 9, 1, 2]),           # the 3-gram, then what followed it
    ([5, 6, 7, 5, 6, 8, 5, 6], [8, 5, 6]),              # latest occurrence; cut at the end
    ([1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3], [7, 9, 2, 3]),  # the longest n-gram wins over later
    ([1, 2, 3, 4, 5, 6], []),                           # nothing repeats
    ([4, 4, 4], [4]),                                   # overlapping: the last token follows
    ([7, 1, 7], []),                                    # 1-grams are below prompt_lookup_min
])
def test_proposals(tokens: list[int], expected: list[int]) -> None:
    assert proposer().propose(request(tokens), 8) == expected


def test_proposals_respect_the_limit_and_k() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 7, 1, 2]
    assert proposer(k=4).propose(request(tokens), 2) == [3, 4]
    assert proposer(k=2).propose(request(tokens), 8) == [3, 4]
    assert proposer().propose(request(tokens), 0) == []


def test_the_index_grows_with_the_output_as_a_fresh_search_would() -> None:
    rng = random.Random(0)
    for trial in range(40):
        min_n, max_n, k = rng.choice([(1, 1), (1, 3), (2, 4), (3, 3)]) + (rng.randint(1, 5),)
        prop = proposer(k, min_n, max_n)
        req = request([rng.randint(1, 4) for _ in range(rng.randint(1, 12))], max_tokens=None)
        for _ in range(30):
            tokens = req.prompt_token_ids + req.output_token_ids
            assert prop.propose(req, 8) == brute_force(tokens, k, min_n, max_n), (trial, tokens)
            req.output_token_ids += [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
        prop.remove(req.request_id)
        assert prop.num_requests == 0


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="speculative method must be one of ngram"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1, got 0"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match=r"prompt_lookup_max \(1\) must be >= "
                                         r"prompt_lookup_min \(2\)"):
        SpeculativeConfig(prompt_lookup_max=1)
    with pytest.raises(ValueError, match="does not run with async scheduling"):
        Scheduler(SchedulerConfig(async_scheduling=True), KVCacheManager(8, 4), 64,
                  proposer=proposer())


# ----- the scheduler ---------------------------------------------------------------------------
PROMPT = [1, 2, 3, 4, 5, 6, 1, 2]       # after the token 3 is sampled: drafts 4 5 6 1


def spec_scheduler(num_blocks: int = 32, budget: int = 64, max_model_len: int = 256,
                   k: int = 4) -> Scheduler:
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=True)
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget), kv,
                     max_model_len, proposer=proposer(k=k))


def run(s: Scheduler, sampled: dict[str, int], accepted: dict[str, int] | None = None
        ) -> SchedulerOutput:
    out = s.schedule()
    s.update(out, RunnerOutput(sampled=sampled, num_accepted=accepted or {}))
    return out


def assert_pool_full(s: Scheduler) -> None:
    assert s.kv.num_free_blocks == s.kv.num_blocks and not s.kv.block_tables
    assert s.proposer is not None and s.proposer.num_requests == 0


def test_drafts_are_scheduled_verified_and_rolled_back() -> None:
    s = spec_scheduler()
    r = request(PROMPT)
    s.add_request(r)
    first = run(s, {"r": 3})                       # the prefill samples 3
    assert first.seqs[0].draft_token_ids == ()
    out = s.schedule()
    (seq,) = out.seqs
    assert (seq.token_ids, seq.num_computed_tokens, seq.sample) == ([3, 4, 5, 6, 1], 8, True)
    assert seq.draft_token_ids == [4, 5, 6, 1] and out.num_scheduled_tokens == 5
    assert len(s.kv.block_tables["r"]) == 4        # 13 tokens' slots: 8 + 3 + 2 drafts more
    s.update(out, RunnerOutput(sampled={"r": 7}, num_accepted={"r": 2}))
    assert r.output_token_ids == [3, 4, 5, 7]      # two drafts kept, then the model's token
    assert r.num_computed_tokens == 11             # 3 4 5 computed; 6 1 to be redone
    third = s.kv.block_tables["r"][2]              # positions 8-11: 3 4 5 7, 7 not computed
    assert s.kv.pool.block_hash(third) is None
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 4, 2)
    assert stats.acceptance_rate == 0.5
    nxt = s.schedule()                             # 4 5 7 and 5 7 were not seen: no drafts
    assert (nxt.seqs[0].token_ids, nxt.seqs[0].num_computed_tokens) == ([7], 11)
    assert s.kv.pool.block_hash(third) is not None  # named once 7 is scheduled to be computed
    s.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert_pool_full(s)


def test_all_drafts_accepted_and_the_bonus_token() -> None:
    s = spec_scheduler()
    r = request(PROMPT)
    s.add_request(r)
    run(s, {"r": 3})
    run(s, {"r": 2}, {"r": 4})
    assert r.output_token_ids == [3, 4, 5, 6, 1, 2] and r.num_computed_tokens == 13


@pytest.mark.parametrize(("max_tokens", "budget", "max_model_len", "drafts"), [
    (3, 64, 256, [4]),           # room for one draft and the token after it
    (1 + 1, 64, 256, []),        # one token left: nothing to draft
    (16, 3, 256, [4, 5]),        # the token budget: the newest token and two drafts
    (16, 64, 12, [4, 5]),        # the context: 9 tokens, 2 drafts, the sampled one
])
def test_drafts_fit_max_tokens_budget_and_context(max_tokens: int, budget: int,
                                                  max_model_len: int, drafts: list[int]
                                                  ) -> None:
    s = spec_scheduler(budget=budget, max_model_len=max_model_len)
    s.add_request(request(PROMPT, max_tokens=max_tokens))
    while s.requests["r"].num_computed_tokens < len(PROMPT):
        run(s, {"r": 3})
    out = s.schedule()
    assert list(out.seqs[0].draft_token_ids) == drafts


def test_an_accepted_stop_token_ends_the_request_there() -> None:
    s = spec_scheduler()
    r = request([1, 2, 0, 5, 1])                   # after 2: drafts 0 5 1 2
    s.add_request(r)
    run(s, {"r": 2})
    out = run(s, {"r": 7}, {"r": 3})
    assert out.seqs[0].draft_token_ids == [0, 5, 1, 2]
    assert r.output_token_ids == [2, 0] and r.status == RequestStatus.FINISHED_STOPPED
    assert_pool_full(s)


def test_max_tokens_reached_inside_the_drafts() -> None:
    s = spec_scheduler()
    r = request(PROMPT, max_tokens=4)
    s.add_request(r)
    run(s, {"r": 3})
    out = run(s, {"r": 9}, {"r": 2})
    assert out.seqs[0].draft_token_ids == [4, 5]   # 4 tokens at most: 3, two drafts, 9
    assert r.output_token_ids == [3, 4, 5, 9] and r.status == RequestStatus.FINISHED_LENGTH
    assert_pool_full(s)


def test_drafts_never_preempt() -> None:
    s = spec_scheduler(num_blocks=4)               # two blocks each: 8 slots, 7 prompt tokens
    a = request([1, 2, 3, 4, 5, 1, 2], "a", max_tokens=8)
    b = request(list(range(11, 18)), "b", max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    run(s, {"a": 3, "b": 19})
    out = s.schedule()                             # a's drafts 4 5 1 2 would need a block
    assert [(q.req_id, q.token_ids, q.draft_token_ids) for q in out.seqs] == [
        ("a", [3], ()), ("b", [19], ())]
    assert s.num_preemptions == 0
    s.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert_pool_full(s)


def test_requests_with_logprobs_get_drafts_too() -> None:
    s = spec_scheduler()
    s.add_request(request(PROMPT, logprobs=1))
    run(s, {"r": 3})
    assert s.schedule().seqs[0].draft_token_ids == [4, 5, 6, 1]
