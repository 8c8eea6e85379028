"""Parsers of the tool calls a model writes in its own format, for tool_choice "auto": the
model decides whether to call a tool, and the server finds the calls in its text.

`hermes` reads the format of Hermes, Qwen2.5 and Qwen3 chat templates: each call a JSON
object `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`, after
any text the model writes first (vLLM's `--tool-call-parser hermes`). A completion whose
calls do not parse stays text, whole.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

HERMES_OPEN = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ParsedCalls:
    """A completion's text before its calls (None: none), and its calls as (function name,
    arguments as JSON text)."""

    content: str | None
    calls: list[tuple[str, str]] = field(default_factory=list)


def parse_hermes(text: str) -> ParsedCalls:
    start = text.find(HERMES_OPEN)
    if start < 0:
        return ParsedCalls(text)
    calls = []
    for match in _HERMES_CALL.finditer(text, start):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return ParsedCalls(text)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return ParsedCalls(text)
        arguments = call.get("arguments", {})
        calls.append((call["name"], arguments if isinstance(arguments, str)
                      else json.dumps(arguments, ensure_ascii=False)))
    if not calls:
        return ParsedCalls(text)
    return ParsedCalls(text[:start].strip() or None, calls)


@dataclass(frozen=True)
class ToolCallParser:
    """One model family's format: the tag that opens a call, and the parser of a whole text."""

    name: str
    opening_tag: str
    parse: Callable[[str], ParsedCalls]

    def safe_prefix(self, text: str, known: int = 0) -> int:
        """How much of a partial completion is text for sure: all of it before a call's
        opening tag, less any tail that could be the start of one (held back while
        streaming). `known`: a length already found safe, so no tag starts before it (a
        stream's search then reads only the new text)."""
        start = text.find(self.opening_tag, known)
        if start >= 0:
            return start
        for n in range(min(len(self.opening_tag) - 1, len(text)), 0, -1):
            if text.endswith(self.opening_tag[:n]):
                return len(text) - n
        return len(text)


TOOL_CALL_PARSERS = {"hermes": ToolCallParser("hermes", HERMES_OPEN, parse_hermes)}


def tool_call_parser_named(name: str | None) -> ToolCallParser | None:
    """The parser called `name` (None: none); ValueError naming the ones there are."""
    if name is None:
        return None
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; expected one of "
                         f"{', '.join(TOOL_CALL_PARSERS)}")
    return TOOL_CALL_PARSERS[name]
