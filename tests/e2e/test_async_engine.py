"""Async scheduling with the real embedded model: every output equals the synchronous
engine's, through chunked prefill, preemption, n > 1, seeded sampling, stop strings,
logprobs, penalties (which fall back to taking each step's tokens in first), prefix caching
of blocks filled by tokens sampled in flight, and an abort while a step is in flight."""
from __future__ import annotations

import pytest

from taskloom import LLM, SamplingParams
from taskloom.outputs import OutputKind, RequestOutput, add_delta
from tests.e2e.test_engine import PROMPTS

# Small blocks and budget: prompts are chunked and requests preempted as they grow.
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=24, block_size=4, num_blocks=20)

MIXED = [
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    SamplingParams(n=2, temperature=0.9, top_k=40, top_p=0.9, seed=3, max_tokens=16),
    SamplingParams(temperature=0.0, max_tokens=30, stop=[".", "\n"]),
    SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=1),
    SamplingParams(temperature=0.0, max_tokens=1),
    SamplingParams(temperature=0.0, max_tokens=12, min_tokens=4, repetition_penalty=1.3,
                   frequency_penalty=0.5, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=11, max_tokens=18, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=20),
]


@pytest.fixture(scope="module")
def sync_llm() -> LLM:
    return LLM(**ENGINE)


@pytest.fixture(scope="module")
def async_llm() -> LLM:
    return LLM(**ENGINE, async_scheduling=True)


def completions(outs: list[RequestOutput]) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs)
             for c in o.outputs] for o in outs]


def test_async_outputs_equal_sync(sync_llm: LLM, async_llm: LLM) -> None:
    prompts = PROMPTS[:len(MIXED)]
    expected = sync_llm.generate(prompts, MIXED)
    got = async_llm.generate(prompts, MIXED)
    assert completions(got) == completions(expected)
    assert [o.prompt_logprobs for o in got] == [o.prompt_logprobs for o in expected]
    assert async_llm.engine.scheduler.num_preemptions > 0
    assert [c.finish_reason for o in got for c in o.outputs].count("stop") >= 1


def test_blocks_filled_in_flight_are_cached_once_known(sync_llm: LLM, async_llm: LLM) -> None:
    """A follow-up whose prompt is a request's prompt plus its output (a chat turn) finds
    the blocks ending in generated tokens: those are named a step late, but named."""
    params = SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True)
    hits = []
    for llm in (sync_llm, async_llm):
        first = llm.generate(PROMPTS[9], params)[0]
        follow_up = first.prompt_token_ids + first.outputs[0].token_ids
        stats = llm.engine.scheduler.kv.stats
        before = stats.hits
        second = llm.generate(follow_up, params)[0]
        hits.append((stats.hits - before, second.outputs[0].token_ids))
    assert hits[0] == hits[1]
    assert hits[1][0] == (len(follow_up) - 1) // 4 * 4      # every full block but the last


def test_abort_in_flight_and_reuse_the_id(sync_llm: LLM, async_llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    tok = async_llm.tokenizer
    alone = sync_llm.generate(PROMPTS[12], params)[0].outputs[0].token_ids
    engine = async_llm.engine
    engine.add_request("x", tok.encode(PROMPTS[0]), params)
    engine.add_request("y", tok.encode(PROMPTS[1]), params)
    for _ in range(3):
        engine.step()
    engine.abort("x")                         # a step holding x is in flight
    engine.add_request("x", tok.encode(PROMPTS[12]), params)
    finished = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert finished["x"] == alone
    assert len(finished["y"]) == 10


def test_streamed_deltas_fold_to_the_sync_completions(sync_llm: LLM, async_llm: LLM) -> None:
    """What a server streams (DELTA outputs): each sample's finish comes once, in its last
    delta, and the deltas fold into the synchronous engine's completions."""
    ids = async_llm.encode_chat([{"role": "user", "content": "Say yes or no."}])
    params = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=24, stop=["."])
    results = []
    for llm in (sync_llm, async_llm):
        llm.engine.add_request("d", ids, params, output_kind=OutputKind.DELTA)
        folded, finishes = None, []
        while llm.engine.has_unfinished:
            for out in llm.engine.step():
                finishes += [c.index for c in out.outputs if c.finish_reason is not None]
                folded = add_delta(folded, out)
        assert sorted(finishes) == [0, 1, 2] and folded.finished
        results.append([(c.token_ids, c.text, c.finish_reason) for c in folded.outputs])
    assert results[0] == results[1]
