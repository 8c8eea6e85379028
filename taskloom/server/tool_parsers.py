"""Parsers of the tool calls a model writes in its own format, for tool_choice "auto": the
model decides whether to call a tool, and the server finds the calls in its text. The names
are vLLM's `--tool-call-parser` names:

- `hermes`: Hermes, Qwen2.5 and Qwen3 chat templates. Each call is a JSON object
  `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`, after any
  text the model writes first.
- `llama3_json`: Llama 3.1, 3.2 and 3.3 (JSON-based tool calling). The completion is the
  calls and nothing else: JSON objects `{"name": ..., "parameters": {...}}` ("arguments" is
  taken too), separated by `;`, optionally after the `<|python_tag|>` token.
- `mistral`: Mistral's instruct models. After any text, the `[TOOL_CALLS]` token, then a
  JSON list of `{"name": ..., "arguments": {...}}` (tokenizers v3), or one or more
  `name[ARGS]{...}` each after its own `[TOOL_CALLS]` (v11 and later). Its tag is a special
  token, so requests it parses keep special tokens in their text; its chat templates accept
  only call ids of 9 letters and digits, so it makes those.

A completion whose calls do not parse stays text, whole.
"""
from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

HERMES_OPEN = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"
MISTRAL_OPEN = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
_ALNUM = string.ascii_letters + string.digits


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
            call = _call_object(json.loads(match.group(1)), ("arguments",))
        except json.JSONDecodeError:
            return ParsedCalls(text)
        if call is None:
            return ParsedCalls(text)
        calls.append(call)
    if not calls:
        return ParsedCalls(text)
    return ParsedCalls(text[:start].strip() or None, calls)


def _call_object(call: object, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a decoded call object, its arguments under the
    first of `keys` it has; None if it is not one."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = next((call[k] for k in keys if k in call), {})
    return call["name"], (arguments if isinstance(arguments, str)
                          else json.dumps(arguments, ensure_ascii=False))


def parse_llama3_json(text: str) -> ParsedCalls:
    body = text.lstrip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return ParsedCalls(text)
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            obj, i = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            return ParsedCalls(text)
        call = _call_object(obj, ("parameters", "arguments"))
        if call is None:
            return ParsedCalls(text)
        calls.append(call)
        rest = body[i:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return ParsedCalls(text)        # text after the calls: not a call completion
        i = len(body) - len(rest)
    return ParsedCalls(None, calls)


def parse_mistral(text: str) -> ParsedCalls:
    start = text.find(MISTRAL_OPEN)
    if start < 0:
        return ParsedCalls(text)
    calls: list[tuple[str, str]] = []
    for part in text[start:].split(MISTRAL_OPEN)[1:]:
        part = part.strip()
        if part.startswith("["):            # a JSON list of calls
            try:
                listed = json.loads(part)
            except json.JSONDecodeError:
                return ParsedCalls(text)
            found = [_call_object(c, ("arguments", "parameters"))
                     for c in (listed if isinstance(listed, list) else [None])]
        else:                               # name[ARGS]{...}
            name, sep, args = part.partition(MISTRAL_ARGS)
            try:
                parsed = json.loads(args) if sep and name.strip() else None
            except json.JSONDecodeError:
                parsed = None
            found = [None if parsed is None else
                     _call_object({"name": name.strip(), "arguments": parsed}, ("arguments",))]
        if not found or None in found:
            return ParsedCalls(text)
        calls += found      # type: ignore[arg-type]
    return ParsedCalls(text[:start].strip() or None, calls)


def openai_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def mistral_call_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


@dataclass(frozen=True)
class ToolCallParser:
    """One model family's format: the tag that opens a call, and the parser of a whole text.

    `calls_lead`: calls only ever open the completion (Llama 3), so a completion that starts
    otherwise is all text, and one that starts with a character of `leading` (or the tag)
    is held back while streaming until it ends. `special_tokens`: the tag is a special token,
    which the completion's text must keep. `call_id` makes the ids of the calls found."""

    name: str
    opening_tag: str
    parse: Callable[[str], ParsedCalls]
    calls_lead: bool = False
    leading: str = ""
    special_tokens: bool = False
    call_id: Callable[[], str] = openai_call_id

    def safe_prefix(self, text: str, known: int = 0) -> int:
        """How much of a partial completion is text for sure: all of it before a call's
        opening tag, less any tail that could be the start of one (held back while
        streaming). `known`: a length already found safe, so no tag starts before it (a
        stream's search then reads only the new text)."""
        if self.calls_lead:
            if known:           # it was found to be text
                return len(text)
            body = text.lstrip()
            if not body or body[0] in self.leading or body.startswith(self.opening_tag) \
                    or self.opening_tag.startswith(body):
                return 0
            return len(text)
        start = text.find(self.opening_tag, known)
        if start >= 0:
            return start
        for n in range(min(len(self.opening_tag) - 1, len(text)), 0, -1):
            if text.endswith(self.opening_tag[:n]):
                return len(text) - n
        return len(text)


TOOL_CALL_PARSERS = {
    "hermes": ToolCallParser("hermes", HERMES_OPEN, parse_hermes),
    "llama3_json": ToolCallParser("llama3_json", PYTHON_TAG, parse_llama3_json,
                                  calls_lead=True, leading="{"),
    "mistral": ToolCallParser("mistral", MISTRAL_OPEN, parse_mistral, special_tokens=True,
                              call_id=mistral_call_id),
}


def tool_call_parser_named(name: str | None) -> ToolCallParser | None:
    """The parser called `name` (None: none); ValueError naming the ones there are."""
    if name is None:
        return None
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; expected one of "
                         f"{', '.join(TOOL_CALL_PARSERS)}")
    return TOOL_CALL_PARSERS[name]
