"""Tool calling through the OpenAI API (the official client): a named function and
"required" hold the completion to the calls' JSON and come back as tool_calls, whole and
streamed, equal to what the engine gives for the same constraint on the same prompt (the
tools rendered by the chat template); a conversation carrying calls and their results is
taken; "auto" finds the calls with the hermes parser, and without a parser it and other
unservable choices are 400s naming tool_choice."""
from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from taskloom import LLM
from taskloom.sampling_params import SamplingParams, StructuredOutputs
from tests.server.conftest import MODEL, start_server, wait_idle

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "unit": {"enum": ["C", "F"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "maxLength": 10}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def engine_text(oracle: LLM, schema: dict, max_tokens: int) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0,
                            structured_outputs=StructuredOutputs(json=schema))
    return oracle.chat(ASK, params, use_tqdm=False, tools=TOOLS)[0].outputs[0].text


def test_a_named_function_is_called_with_arguments_of_its_schema(client: openai.OpenAI,
                                                                 oracle: LLM) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice=NAMED, temperature=0, max_tokens=48)
    msg = r.choices[0].message
    assert msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_") and r.choices[0].finish_reason == "stop"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F")
    assert call.function.arguments == engine_text(oracle, WEATHER, 48)
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                            tool_choice=NAMED, temperature=0, max_tokens=48,
                                            stream=True)
    deltas = [d.tool_calls[0] for c in stream if c.choices
              for d in [c.choices[0].delta] if d.tool_calls]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments


def test_required_calls_some_of_the_tools(client: openai.OpenAI, oracle: LLM) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice="required", temperature=0, max_tokens=96,
                                       parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    schema = WEATHER if calls[0].function.name == "get_weather" else TIME
    assert set(json.loads(calls[0].function.arguments)) == set(schema["required"])
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                            tool_choice="required", temperature=0,
                                            max_tokens=96, parallel_tool_calls=False,
                                            stream=True)
    streamed = [t for c in stream if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.function.name, t.function.arguments) for t in streamed] == \
        [(c.function.name, c.function.arguments) for c in calls]


def test_a_conversation_with_calls_and_their_results_is_taken(client: openai.OpenAI) -> None:
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=16)
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("extra,message", [
    ({"tools": TOOLS}, 'tool_choice "auto" (the default with tools) needs a parser'),
    ({"tools": TOOLS, "tool_choice": "auto"}, "send tool_choice \"required\""),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "names 'nope', which is not among the tools (get_weather, get_time)"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined with another structured output"),
])
def test_unservable_tool_choices_are_400s(client: openai.OpenAI, extra: dict,
                                          message: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4,
                                       extra_body=extra)
    assert e.value.body["param"] == "tool_choice" and message in e.value.body["message"]


# The model writes this when a regex holds it to the format (the embedded model has no tool
# training): the hermes parser must find the call after the text, whole and streamed.
HERMES_TEXT = (r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
               r'\{"city": "Paris", "unit": "C"\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def hermes_client() -> Iterator[openai.OpenAI]:
    llm = LLM(max_num_seqs=4, kv_cache_memory_gb=0.1)
    st = start_server(llm, tool_call_parser="hermes")
    yield openai.OpenAI(base_url=st.base_url + "/v1", api_key="unused", max_retries=0,
                        timeout=120)
    st.stop()
    wait_idle(llm)


def test_auto_with_the_hermes_parser_finds_the_calls(hermes_client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0,
          "max_tokens": 64, "extra_body": {"guided_regex": HERMES_TEXT}}
    r = hermes_client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    chunks = [c.choices[0] for c in hermes_client.chat.completions.create(**kw, stream=True)
              if c.choices]
    text = "".join(c.delta.content or "" for c in chunks)
    calls = [t for c in chunks for t in c.delta.tool_calls or []]
    assert text == "Let me check.\n" and chunks[-1].finish_reason == "tool_calls"
    assert [(t.function.name, t.function.arguments) for t in calls] == \
        [("get_weather", call.function.arguments)]
    plain = hermes_client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                  temperature=0, max_tokens=12)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


# Llama 3's format, forced the same way: the completion is the call, nothing before it.
LLAMA3_TEXT = (r'\{"name": "get_weather", "parameters": \{"city": "Paris", "unit": "C"\}\}')


def test_auto_with_the_llama3_json_parser_streams_nothing_but_the_call() -> None:
    llm = LLM(max_num_seqs=4, kv_cache_memory_gb=0.1)
    st = start_server(llm, tool_call_parser="llama3_json")
    try:
        client = openai.OpenAI(base_url=st.base_url + "/v1", api_key="unused", max_retries=0,
                               timeout=120)
        kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0,
              "max_tokens": 64, "extra_body": {"guided_regex": LLAMA3_TEXT}}
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == \
            ("get_weather", {"city": "Paris", "unit": "C"})
        chunks = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True)
                  if c.choices]
        assert not "".join(c.delta.content or "" for c in chunks)   # held back, then a call
        calls = [t for c in chunks for t in c.delta.tool_calls or []]
        assert [(t.function.name, t.function.arguments) for t in calls] == \
            [("get_weather", call.function.arguments)]
        assert chunks[-1].finish_reason == "tool_calls"
        plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                               temperature=0, max_tokens=12, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
        assert text and not text.lstrip().startswith("{")
    finally:
        st.stop()
        wait_idle(llm)


def test_a_parser_whose_tag_is_a_special_token_keeps_special_tokens(server_llm: LLM) -> None:
    """Mistral's [TOOL_CALLS] is a special token: "auto" requests keep them in their text."""
    from taskloom.server.chat import prepare_chat
    from taskloom.server.protocol import ChatCompletionRequest
    from taskloom.server.serving import ModelContext
    from taskloom.server.tool_parsers import TOOL_CALL_PARSERS
    body = ChatCompletionRequest(model=MODEL, messages=ASK, tools=TOOLS)
    for name, skips in (("mistral", False), ("hermes", True), ("llama3_json", True)):
        ctx = ModelContext(server_llm.tokenizer, MODEL, 2048, 49152,
                           tool_call_parser=TOOL_CALL_PARSERS[name])
        assert prepare_chat(ctx, body).params.skip_special_tokens is skips
