"""The tool-call parsers of tool_choice "auto" (hermes, llama3_json, mistral): calls found
where each format puts them, malformed calls left as text, the streaming guard that holds
back what could be the start of a call, and Mistral's call ids."""
from __future__ import annotations

import pytest

from taskloom.server.tool_parsers import TOOL_CALL_PARSERS, ParsedCalls, tool_call_parser_named

HERMES = TOOL_CALL_PARSERS["hermes"]


def test_calls_after_text_and_several_calls() -> None:
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": '
            '\\"CET\\"}"}</tool_call>')
    assert HERMES.parse(text) == ParsedCalls("Let me look.", [
        ("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')])
    assert HERMES.parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>') == \
        ParsedCalls(None, [("f", "{}")])


@pytest.mark.parametrize("text", [
    "no call here", "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": "f"',
])
def test_what_does_not_parse_stays_text(text: str) -> None:
    assert HERMES.parse(text) == ParsedCalls(text)


def test_streaming_holds_back_a_possible_tag() -> None:
    assert HERMES.safe_prefix("Hello") == 5
    assert HERMES.safe_prefix("Hello <tool") == 6          # "<tool" may open a call
    assert HERMES.safe_prefix("Hello <toolbox") == 14
    assert HERMES.safe_prefix("Hi <tool_call>{") == 3
    assert HERMES.safe_prefix("Hi <tool_call>{", 3) == 3     # searched from what was safe
    assert tool_call_parser_named(None) is None
    with pytest.raises(ValueError, match="unknown tool-call parser 'x'; expected one of "
                                         "hermes, llama3_json, mistral"):
        tool_call_parser_named("x")


LLAMA3 = TOOL_CALL_PARSERS["llama3_json"]
MISTRAL = TOOL_CALL_PARSERS["mistral"]


def test_llama3_calls_are_the_whole_completion() -> None:
    assert LLAMA3.parse('{"name": "get_weather", "parameters": {"city": "Paris"}}') == \
        ParsedCalls(None, [("get_weather", '{"city": "Paris"}')])
    text = ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; '
            '{"name": "b", "arguments": {"y": [2]}}\n')
    assert LLAMA3.parse(text) == ParsedCalls(None, [("a", '{"x": 1}'), ("b", '{"y": [2]}')])
    assert LLAMA3.parse(' {"name": "f"}') == ParsedCalls(None, [("f", "{}")])


@pytest.mark.parametrize("text", [
    "The answer is 4.", 'Sure: {"name": "f", "parameters": {}}',
    '{"name": "f", "parameters": {}} and then text', '{"parameters": {}}', '{"name": "f", ',
    '{"name": "f", "parameters": {}};;',
])
def test_llama3_what_does_not_parse_stays_text(text: str) -> None:
    assert LLAMA3.parse(text) == ParsedCalls(text)


def test_llama3_streaming_holds_back_a_completion_that_opens_like_a_call() -> None:
    assert LLAMA3.safe_prefix("") == 0 and LLAMA3.safe_prefix("  ") == 0
    assert LLAMA3.safe_prefix('{"na') == 0
    assert LLAMA3.safe_prefix("<|python") == 0 and LLAMA3.safe_prefix("<|python_tag|>{") == 0
    assert LLAMA3.safe_prefix("Paris is") == 8
    assert LLAMA3.safe_prefix('Paris is {"name"', 8) == 16     # text once it starts as text
    assert not LLAMA3.special_tokens


def test_mistral_calls_after_text_in_both_formats() -> None:
    v3 = ('Checking.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
          '{"name": "get_time", "arguments": {}}]')
    assert MISTRAL.parse(v3) == ParsedCalls("Checking.", [
        ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")])
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}'
    assert MISTRAL.parse(v11) == ParsedCalls(None, [
        ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")])
    assert MISTRAL.special_tokens       # [TOOL_CALLS] is one: the text keeps it


@pytest.mark.parametrize("text", [
    "no calls", "[TOOL_CALLS] [{not json}]", '[TOOL_CALLS] [{"arguments": {}}]',
    "[TOOL_CALLS]f[ARGS]{oops", '[TOOL_CALLS]{"name": "f"}', "[TOOL_CALLS] []",
])
def test_mistral_what_does_not_parse_stays_text(text: str) -> None:
    assert MISTRAL.parse(text) == ParsedCalls(text)


def test_mistral_streaming_guard_and_call_ids() -> None:
    assert MISTRAL.safe_prefix("Checking.[TOOL") == 9
    assert MISTRAL.safe_prefix("Checking.[TOOL_CALLS][") == 9
    ids = {MISTRAL.call_id() for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert HERMES.call_id().startswith("call_")
