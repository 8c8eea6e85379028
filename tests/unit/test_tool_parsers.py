"""The hermes tool-call parser (tool_choice "auto"): calls found after the text the model
writes first, malformed calls left as text, and the streaming guard that holds back what
could be the start of a call's tag."""
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
    with pytest.raises(ValueError, match="unknown tool-call parser 'x'; expected one of hermes"):
        tool_call_parser_named("x")
