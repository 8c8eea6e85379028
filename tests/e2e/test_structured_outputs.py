"""Structured outputs with the embedded model: completions held to a JSON schema, any JSON
object, a regex, a choice and a Lark grammar, greedy and sampled, alone and batched with
unconstrained requests (whose outputs do not change), with async scheduling and with
speculative decoding (the drafts cut to what each grammar takes, a mask per position): the
same outputs; bad constraints refused alone; the pool full after each."""
from __future__ import annotations

import dataclasses

import json
import re
import pytest

from taskloom import LLM
from taskloom.sampling_params import SamplingParams, StructuredOutputs

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
ASK_SKY = [{"role": "user", "content": "What color is the sky? One word."}]
ASK_PHONE = [{"role": "user", "content": "Write a phone number."}]
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
ARITH = 'start: expr\nexpr: NUMBER " + " NUMBER " = " NUMBER\nNUMBER: /[0-9]{1,3}/\n'


def cases() -> list[tuple[list[dict], SamplingParams]]:
    def so(**kw: object) -> StructuredOutputs:
        return StructuredOutputs(**kw)      # type: ignore[arg-type]
    return [
        (ASK_PERSON, SamplingParams(max_tokens=64, temperature=0, structured_outputs=so(
            json=PERSON))),
        (ASK_PERSON, SamplingParams(max_tokens=64, temperature=0.9, seed=3, n=2,
                                    structured_outputs=so(json=json.dumps(PERSON)))),
        (ASK_PERSON, SamplingParams(max_tokens=64, temperature=0, structured_outputs=so(
            json_object=True))),
        (ASK_SKY, SamplingParams(max_tokens=8, temperature=0, structured_outputs=so(
            choice=["blue", "green", "red"]))),
        (ASK_PHONE, SamplingParams(max_tokens=24, temperature=0.8, seed=1,
                                   structured_outputs=so(regex=PHONE))),
        (ASK_PHONE, SamplingParams(max_tokens=24, temperature=0, structured_outputs=so(
            grammar=ARITH))),
    ]


def check(outs: list, batch: list[tuple[list[dict], SamplingParams]]) -> None:
    """Every completion obeys its constraint and ended because the constraint was met."""
    for out, (_, params) in zip(outs, batch):
        so = params.structured_outputs
        for c in out.outputs:
            assert c.finish_reason == "stop", (c.text, c.finish_reason)
            if so is None:
                continue
            if so.json is not None:
                value = json.loads(c.text)
                assert set(value) == {"name", "age"} and isinstance(value["name"], str)
                assert isinstance(value["age"], int) and value["age"] >= 0
            elif so.json_object:
                assert isinstance(json.loads(c.text), dict)
            elif so.choice is not None:
                assert c.text in so.choice
            elif so.regex is not None:
                assert re.fullmatch(so.regex, c.text), c.text
            else:
                assert re.fullmatch(r"[0-9]{1,3} \+ [0-9]{1,3} = [0-9]{1,3}", c.text), c.text


def texts(outs: list) -> list[list[str]]:
    return [[c.text for c in o.outputs] for o in outs]


def assert_pool_full(llm: LLM) -> None:
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks and not llm.engine.has_unfinished


@pytest.fixture(scope="module")
def expected(llm: LLM) -> list[list[str]]:
    batch = cases()
    outs = llm.chat([m for m, _ in batch], [p for _, p in batch], use_tqdm=False)
    check(outs, batch)
    return texts(outs)


def test_every_constraint_is_obeyed_and_alone_equals_batched(
        llm: LLM, expected: list[list[str]]) -> None:
    for (messages, params), want in zip(cases()[:4], expected):
        assert texts(llm.chat(messages, params, use_tqdm=False)) == [want]
    assert_pool_full(llm)


def test_unconstrained_requests_in_the_batch_are_unchanged(llm: LLM,
                                                           expected: list[list[str]]) -> None:
    plain = (ASK_PERSON, SamplingParams(max_tokens=40, temperature=0))
    before = dataclasses.replace(llm.engine.step_times)
    alone = texts(llm.chat(plain[0], plain[1], use_tqdm=False))
    assert llm.engine.step_times.since(before).masks == 0
    batch = [plain, *cases(), plain]
    before = dataclasses.replace(llm.engine.step_times)
    outs = llm.chat([m for m, _ in batch], [p for _, p in batch], use_tqdm=False)
    times = llm.engine.step_times.since(before)
    assert texts(outs) == [alone[0], *expected, alone[0]]
    assert 0 < times.masks < times.execute      # the masks came within the runner's part
    assert not alone[0][0].startswith("{")         # the constraint is what made the JSON
    assert_pool_full(llm)


@pytest.mark.parametrize("engine", ["async", "speculative"])
def test_async_scheduling_and_speculative_decoding_give_the_same_outputs(
        engine: str, expected: list[list[str]]) -> None:
    kw = {"async_scheduling": True} if engine == "async" else \
        {"speculative_config": {"num_speculative_tokens": 3}}
    llm = LLM(max_num_seqs=16, kv_cache_memory_gb=0.25, **kw)
    batch = cases()
    outs = llm.chat([m for m, _ in batch], [p for _, p in batch], use_tqdm=False)
    assert texts(outs) == expected
    if engine == "speculative":     # the grammars' requests drafted too, with a mask each
        assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0
    assert_pool_full(llm)


def test_bad_constraints_are_refused_alone(llm: LLM) -> None:
    bad = [StructuredOutputs(json={"type": "nonsense"}), StructuredOutputs(regex="(unclosed"),
           StructuredOutputs(grammar="start: missing_rule"), StructuredOutputs(json="{not json")]
    for so in bad:
        with pytest.raises(ValueError, match=r"invalid structured output \((json|regex|"
                                             r"grammar)\)"):
            llm.chat(ASK_SKY, SamplingParams(max_tokens=4, structured_outputs=so),
                        use_tqdm=False)
    ok = llm.chat(ASK_SKY, SamplingParams(max_tokens=4, temperature=0, structured_outputs=
                                             StructuredOutputs(choice=["blue"])), use_tqdm=False)
    assert ok[0].outputs[0].text == "blue"
    assert_pool_full(llm)
