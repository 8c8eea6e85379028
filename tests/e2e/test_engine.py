"""The engine with the real embedded model: abort, n > 1, stop strings, logprobs, seeded
sampling, bad input; and, on the tiny chat model (the embedded model's tokenizer, random
weights, a few milliseconds a step), batch invariance across chunking and preemption."""
from __future__ import annotations

import dataclasses
import math

import pytest

from taskloom import LLM, SamplingParams
from taskloom.outputs import OutputKind, RequestOutput, add_delta

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "Translate to French: good morning",
    "Q: What is 12 times 12?\nA:",
    "The three primary colors are",
    "import numpy as np\n\n# compute the mean of",
    "Hello",
    "List five fruits:",
    "Explain photosynthesis in one sentence.",
    "The quick brown fox",
    "In 1969, the first humans",
    "SELECT name FROM users WHERE",
    "Roses are red, violets are blue,",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
LONG_GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(tiny_llm: LLM) -> list[list[int]]:
    """The tiny chat model's completion of each prompt run by itself."""
    return [tiny_llm.generate(p, LONG_GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def chunked_llm(tiny_model: str) -> LLM:
    return LLM(tiny_model, max_num_seqs=16, max_num_batched_tokens=7, kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def tiny_pool_llm(tiny_model: str) -> LLM:
    # 16 blocks of 4 tokens: a few requests at a time, preempted as they grow.
    return LLM(tiny_model, max_num_seqs=16, block_size=4, num_blocks=16)


def test_batch_equals_alone(tiny_llm: LLM, alone: list[list[int]]) -> None:
    outs = tiny_llm.generate(PROMPTS, LONG_GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert all(len(t) == 32 for t in alone)
    assert len({tuple(t) for t in alone}) == len(PROMPTS)


def test_batch_equals_alone_with_chunked_prefill(chunked_llm: LLM,
                                                 alone: list[list[int]]) -> None:
    outs = chunked_llm.generate(PROMPTS, LONG_GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_batch_equals_alone_under_preemption(tiny_pool_llm: LLM,
                                             alone: list[list[int]]) -> None:
    outs = tiny_pool_llm.generate(PROMPTS, LONG_GREEDY)
    assert tiny_pool_llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_outputs_in_input_order_with_text_and_prompt_ids(llm: LLM) -> None:
    outs = llm.generate(PROMPTS[:3], GREEDY)
    for prompt, out in zip(PROMPTS[:3], outs):
        assert out.prompt == prompt
        assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        c = out.outputs[0]
        assert c.text == llm.tokenizer.decode(c.token_ids)
        assert c.finish_reason == "length"


def test_stop_string_truncates_and_is_never_emitted(llm: LLM) -> None:
    full = llm.generate(PROMPTS[4], GREEDY)[0].outputs[0].text
    stop = full[10:14]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])
    out = llm.generate(PROMPTS[4], params)[0].outputs[0]
    assert out.text == full[:full.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    streamed = "".join(o.outputs[0].text_delta for o in llm.stream(PROMPTS[4], params))
    assert streamed == out.text


def test_eos_stops_with_reason_stop(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "Say hi."}],
                   SamplingParams(temperature=0.0, max_tokens=200))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] in llm.engine.eos_token_ids
    assert "<|im_end|>" not in out.text


def test_stream_close_aborts_and_frees(llm: LLM) -> None:
    stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert not llm.engine.has_unfinished


def test_abort_while_waiting_and_running(llm: LLM) -> None:
    p = SamplingParams(max_tokens=30, ignore_eos=True)
    for rid in ("a", "b", "c"):
        llm.engine.add_request(rid, llm.tokenizer.encode(PROMPTS[0]), p)
    llm.engine.step()
    llm.engine.abort("b")
    llm.engine.step()
    llm.engine.abort("a")
    llm.engine.abort("c")
    llm.engine.abort("unknown")
    llm.engine.step()


def test_n_samples_are_seeded_and_distinct(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    a = llm.generate(PROMPTS[1], params)[0]
    b = llm.generate([PROMPTS[1], PROMPTS[2]], [params, SamplingParams(seed=1)])[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


def test_seeded_sampling_is_batch_invariant(llm: LLM) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=20)
    alone = llm.generate(PROMPTS[5], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=20)] * 4
    batch = llm.generate(PROMPTS[:4] + [PROMPTS[5]], others + [params])
    assert batch[-1].outputs[0].token_ids == alone


def test_logprobs_and_prompt_logprobs(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, prompt_logprobs=2)
    out = llm.generate(PROMPTS[0], params)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 5
    for tok, pos in zip(c.token_ids, c.logprobs):
        assert next(iter(pos)) == tok and pos[tok].rank == 1  # greedy: chosen is the top
        assert 3 <= len(pos) <= 4
        values = [lp.logprob for lp in pos.values()]
        assert all(v <= 0 for v in values) and math.isclose(max(values), pos[tok].logprob)
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(out.prompt_token_ids)
    for tok, pos in zip(out.prompt_token_ids[1:], plp[1:]):
        assert next(iter(pos)) == tok and 2 <= len(pos) <= 3


def test_prompt_logprobs_survive_chunking(chunked_llm: LLM, tiny_llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    a = tiny_llm.generate(PROMPTS[4], params)[0].prompt_logprobs
    b = chunked_llm.generate(PROMPTS[4], params)[0].prompt_logprobs
    assert len(a) == len(b)
    for pa, pb in zip(a[1:], b[1:]):
        assert pa.keys() == pb.keys()
        for t in pa:
            assert math.isclose(pa[t].logprob, pb[t].logprob, abs_tol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"n": 0}, "n must be >= 1"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"top_k": -3}, "top_k must be"),
    ({"min_p": 2.0}, "min_p must be in"),
    ({"logprobs": 21}, "logprobs must be between 0 and 20"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
])
def test_invalid_sampling_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_fail_alone(llm: LLM) -> None:
    good = SamplingParams(temperature=0.0, max_tokens=8)
    llm.engine.add_request("keep", llm.tokenizer.encode(PROMPTS[0]), good)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", good)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 10**9]], good)
    too_long = [5] * (llm.engine.scheduler.max_model_len + 3)
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens but the model's context"):
        llm.generate([PROMPTS[0], too_long], good)
    assert llm.engine.num_unfinished == 1  # the good prompt of that list was withdrawn
    while llm.engine.has_unfinished:
        done = [o for o in llm.engine.step() if o.finished]
    assert done[0].request_id == "keep" and len(done[0].outputs[0].token_ids) == 8


def test_missing_model_path() -> None:
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        LLM("/no/such/model")


def test_output_kinds_deliver_the_same_completions(llm: LLM) -> None:
    """One request three ways: CUMULATIVE outputs every step, DELTA outputs of only the new
    part of the completions that changed, FINAL_ONLY one output at the end. Three seeded
    samples that finish at different steps (3, 2 and 24 tokens), with logprobs (equal up to
    the float noise of sitting in different rows of the batch)."""
    ids = llm.encode_chat([{"role": "user", "content": "Say yes or no."}])
    params = SamplingParams(n=3, temperature=1.0, seed=14, max_tokens=24, logprobs=2)
    for kind in OutputKind:
        llm.engine.add_request(kind.value, ids, params, output_kind=kind)
    outputs: dict[str, list[RequestOutput]] = {kind.value: [] for kind in OutputKind}
    while llm.engine.has_unfinished:
        for out in llm.engine.step():
            outputs[out.request_id].append(out)
    cumulative, deltas = outputs["cumulative"], outputs["delta"]
    (final,) = outputs["final_only"]
    assert [len(c.token_ids) for c in final.outputs] == [3, 2, 24]
    assert len(cumulative) == len(deltas) == 24
    for kind_outputs in (cumulative, deltas):
        assert [o.finished for o in kind_outputs] == [False] * 23 + [True]
    # FINAL_ONLY: its deltas hold everything since its last output, the whole completion.
    assert all(c.token_ids_delta == c.token_ids and c.text_delta == c.text
               for c in final.outputs)
    # DELTA: only changed completions, each once finished, and holding only the new part.
    assert [sorted(c.index for c in o.outputs) for o in deltas[:4]] == [[0, 1, 2]] * 2 + [
        [0, 2], [2]]
    assert all(len(c.token_ids) == 1 and len(c.logprobs) == 1 and c.token_ids_delta ==
               c.token_ids and c.text_delta == c.text for o in deltas for c in o.outputs)
    finishes = [c.index for o in deltas for c in o.outputs if c.finish_reason is not None]
    assert sorted(finishes) == [0, 1, 2]
    folded = None
    for out in deltas:
        folded = add_delta(folded, out)
    for want in (cumulative[-1], final):
        for got, c in zip(folded.outputs, want.outputs, strict=True):
            assert (got.index, got.token_ids, got.text, got.finish_reason) == (
                c.index, c.token_ids, c.text, c.finish_reason)
            assert [list(p) for p in got.logprobs] == [list(p) for p in c.logprobs]
            assert [lp.logprob for p in got.logprobs for lp in p.values()] == pytest.approx(
                [lp.logprob for p in c.logprobs for lp in p.values()], abs=1e-4)
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.scheduler.kv.num_blocks


def test_step_times_add_up(llm: LLM) -> None:
    before = dataclasses.replace(llm.engine.step_times)
    llm.generate(PROMPTS[:3], GREEDY)
    times = llm.engine.step_times.since(before)
    assert times.steps >= GREEDY.max_tokens
    ms = times.per_step_ms()
    assert ms["steps"] == times.steps
    assert 0 < ms["prepare"] <= ms["execute"]
    assert ms["host_only"] == pytest.approx(
        ms["schedule"] + ms["prepare"] + ms["update"] + ms["outputs"], abs=0.01)
