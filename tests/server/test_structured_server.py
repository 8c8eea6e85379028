"""Structured outputs through the OpenAI API, driven by the official client: response_format
(json_schema, json_object) on chat completions, vLLM's structured_outputs and guided_* on
completions, whole and streamed; each equals what the engine gives for the same
constraint, and a bad or doubled constraint is a 400 naming the parameter."""
from __future__ import annotations

import json

import openai
import pytest

from taskloom import LLM
from taskloom.sampling_params import SamplingParams, StructuredOutputs
from tests.server.conftest import MODEL

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                         "country": {"type": "string", "maxLength": 16}},
        "required": ["city", "country"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Name a city and its country, as JSON."}]


def expected_chat(oracle: LLM, so: StructuredOutputs, max_tokens: int = 48) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=so)
    return oracle.chat(ASK, params, use_tqdm=False)[0].outputs[0].text


def test_response_format_json_schema_and_json_object(client: openai.OpenAI,
                                                     oracle: LLM) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": CITY,
                                                  "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=48,
                                       temperature=0, response_format=fmt)
    text = r.choices[0].message.content
    assert set(json.loads(text)) == {"city", "country"}
    assert r.choices[0].finish_reason == "stop"
    assert text == expected_chat(oracle, StructuredOutputs(json=CITY))
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=48,
                                            temperature=0, stream=True,
                                            response_format={"type": "json_object"})
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(streamed), dict)
    assert streamed == expected_chat(oracle, StructuredOutputs(json_object=True))


def test_vllm_structured_outputs_and_guided_fields_on_completions(client: openai.OpenAI,
                                                                   oracle: LLM) -> None:
    prompt = "Q: Is water wet? A (yes or no):"
    for extra in ({"structured_outputs": {"choice": ["yes", "no"]}},
                  {"guided_choice": ["yes", "no"]}):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                      temperature=0, extra_body=extra)
        assert r.choices[0].text in ("yes", "no")
    want = oracle.generate(prompt, SamplingParams(max_tokens=12, temperature=0,
                                                  structured_outputs={"regex": "[0-9]{2,4}"}),
                           use_tqdm=False)[0].outputs[0].text
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"guided_regex": "[0-9]{2,4}"})
    assert r.choices[0].text == want


@pytest.mark.parametrize("body,param,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "needs json_schema.schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs",
     "invalid structured output (regex)"),
    ({"guided_json": {"type": "nonsense"}}, "structured_outputs",
     "invalid structured output (json)"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice",
     "one structured output at most"),
])
def test_bad_constraints_are_400s_naming_the_parameter(client: openai.OpenAI, body: dict,
                                                       param: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4,
                                       extra_body=body)
    err = e.value.body
    assert err["param"] == param and message in err["message"], err
