"""Speculative decoding (prompt lookup) with the embedded model: the outputs are those of the
same engine without it, token for token, for greedy, seeded sampling, penalties, min_tokens,
stop strings, n > 1 and logprobs, in a mixed batch and under preemption; the drafts are used
(accepted tokens > 0) and nothing leaks."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from taskloom import LLM
from taskloom.sampling_params import SamplingParams

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
TEXT = ("Prompt lookup decoding bets that the next tokens repeat earlier ones. A summary "
        "quotes its source, an edit copies most of the code it changes, and an extraction "
        "repeats field names. The model checks every proposed token in one forward pass and "
        "keeps those it would have produced itself.")
REPEAT = [{"role": "user", "content": f"Repeat the following paragraph word for word.\n\n{TEXT}"}]
LIST = [{"role": "user", "content": "List the days of the week, one per line, twice."}]
CASES = [
    (REPEAT, SamplingParams(max_tokens=64, temperature=0)),
    (REPEAT, SamplingParams(max_tokens=48, temperature=0.8, seed=1)),
    (LIST, SamplingParams(max_tokens=48, temperature=0.7, seed=2, repetition_penalty=1.1,
                          frequency_penalty=0.2, min_tokens=20)),
    (REPEAT, SamplingParams(max_tokens=64, temperature=0, stop=["forward pass"])),
    (LIST, SamplingParams(max_tokens=40, temperature=1.0, seed=3, n=2)),
    (REPEAT, SamplingParams(max_tokens=16, temperature=0, logprobs=2)),
    (REPEAT, SamplingParams(max_tokens=3, temperature=0)),
]


@pytest.fixture(scope="module")
def spec_llm() -> Iterator[LLM]:
    yield LLM(max_num_seqs=16, kv_cache_memory_gb=0.25, speculative_config=SPEC)


@pytest.fixture(scope="module")
def tiny_spec_llm() -> Iterator[LLM]:
    """A pool of 16 blocks of 16: a request or two at once, the rest preempted."""
    yield LLM(max_num_seqs=8, num_blocks=16, speculative_config=SPEC)


def completions(llm: LLM) -> list[list[tuple]]:
    outs = llm.chat([c for c, _ in CASES], [p for _, p in CASES], use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outs]


@pytest.fixture(scope="module")
def without_drafts(llm: LLM) -> list[list[tuple]]:
    """The cases' completions by the engine without speculation."""
    return completions(llm)


def test_outputs_are_those_without_speculation(spec_llm: LLM,
                                               without_drafts: list[list[tuple]]) -> None:
    stats = spec_llm.engine.scheduler.spec_stats
    before = stats.num_accepted_tokens
    assert completions(spec_llm) == without_drafts
    assert stats.num_accepted_tokens - before > 20


def test_drafts_attended_as_one_decode_per_token(spec_llm: LLM,
                                                without_drafts: list[list[tuple]]) -> None:
    """How a GPU runner with CUDA graphs runs a step of decodes with drafts (each token a
    decode of its own, so that the step replays a graph): the same outputs on the CPU."""
    runner = spec_llm.engine.runner
    split_before = runner.split_drafted
    runner.split_drafted = True
    try:
        assert completions(spec_llm) == without_drafts
    finally:
        runner.split_drafted = split_before


def test_logprobs_requests_keep_their_logprobs(llm: LLM, spec_llm: LLM) -> None:
    """Each token of a step with drafts gets the logprobs of its own position."""
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=3)
    stats = spec_llm.engine.scheduler.spec_stats
    before = stats.num_accepted_tokens
    (want,), (got,) = llm.chat(REPEAT, params, use_tqdm=False), \
        spec_llm.chat(REPEAT, params, use_tqdm=False)
    assert stats.num_accepted_tokens - before > 10
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len(got.outputs[0].logprobs) == len(want.outputs[0].logprobs) == 32
    for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
        assert a.keys() == b.keys()
        assert [v.logprob for v in a.values()] == pytest.approx(
            [v.logprob for v in b.values()], abs=1e-4)


def test_under_preemption(llm: LLM, tiny_spec_llm: LLM) -> None:
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.9, seed=7, ignore_eos=True)] * 2
    convs = [REPEAT] * 4
    want = [o.outputs[0].token_ids for o in llm.chat(convs, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tiny_spec_llm.chat(convs, params, use_tqdm=False)]
    assert got == want
    assert tiny_spec_llm.engine.scheduler.num_preemptions > 0


def test_a_step_streams_several_tokens(spec_llm: LLM) -> None:
    ids = spec_llm.encode_chat(REPEAT)
    outs = list(spec_llm.stream(ids, SamplingParams(max_tokens=48, temperature=0)))
    final = outs[-1].outputs[0]
    assert "".join(o.outputs[0].text_delta for o in outs) == final.text
    assert max(len(o.outputs[0].token_ids_delta) for o in outs) > 1
    assert len(outs) < len(final.token_ids)


def test_abort_in_the_middle(spec_llm: LLM) -> None:
    engine = spec_llm.engine
    engine.add_request("a", spec_llm.encode_chat(REPEAT), SamplingParams(max_tokens=64))
    for _ in range(6):
        engine.step()
    assert engine.scheduler.spec_stats.num_drafts
    engine.abort("a")
    engine.step()


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="does not run with async scheduling"):
        LLM(async_scheduling=True, speculative_config=SPEC)
    with pytest.raises(ValueError, match="unknown speculative_config keys num_spec_tokens"):
        LLM(speculative_config={"num_spec_tokens": 3})
