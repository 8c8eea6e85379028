"""Tool calling on /v1/chat/completions, by structured outputs.

The request's `tools` reach the chat template, which shows them to the model in its own
format. `tool_choice` then decides what the completion is:
- a named function (`{"type": "function", "function": {"name": ...}}`): the completion is held
  to that function's `parameters` schema, and comes back as one tool call whose arguments
  are the completion's JSON;
- "required": the completion is held to a JSON array of one or more
  `{"name": <a tool>, "parameters": <its arguments>}` (one only without
  `parallel_tool_calls`), and comes back as those tool calls;
- "auto", OpenAI's default when tools are given: the model decides, writing any calls in
  its own format, which a parser of that format (`--tool-call-parser`,
  taskloom.server.tool_parsers) finds; a completion with calls has finish_reason
  "tool_calls". Without a parser, "auto" is refused with a 400 that says what to send
  instead (as vLLM refuses it without one);
- "none": the model answers in text.

This is what vLLM does; a named or required call has finish_reason "stop", as there.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskloom.sampling_params import StructuredOutputs
from taskloom.server.errors import bad_request
from taskloom.server.protocol import ChatCompletionRequest, NamedToolChoice
from taskloom.server.tool_parsers import ToolCallParser, openai_call_id

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat body's tools make of its completion."""

    tools: list[dict[str, Any]] | None      # for the chat template
    structured: StructuredOutputs | None    # the constraint on the completion
    named: str | None = None                # the function every completion calls
    required: bool = False                  # the completion is a list of calls
    parser: ToolCallParser | None = None    # "auto": finds the calls in the text

    @property
    def calls_tools(self) -> bool:
        return self.named is not None or self.required or self.parser is not None


def plan_tools(body: ChatCompletionRequest, parser: ToolCallParser | None = None) -> ToolPlan:
    """The body's tool plan (`parser`: the server's, for "auto"); a 400 APIError for a
    choice that cannot be served."""
    tools = body.tools or []
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan(None, None)
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "none":
        return ToolPlan(rendered, None)
    if (choice is None or choice == "auto") and parser is not None:
        return ToolPlan(rendered, None, parser=parser)
    if choice is None or choice == "auto":
        raise bad_request('tool_choice "auto" (the default with tools) needs a parser of the '
                          "model's own tool-call format, which taskloom does not have: send "
                          'tool_choice "required", or name a function', "tool_choice")
    params = {t.function.name: t.function.parameters or ANY_OBJECT for t in tools}
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in params:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools "
                              f"({', '.join(params)})", "tool_choice")
        return ToolPlan(rendered, StructuredOutputs(json=params[name]), named=name)
    calls: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
         "properties": {"name": {"const": name}, "parameters": schema}}
        for name, schema in params.items()]}}
    if not body.parallel_tool_calls:
        calls["maxItems"] = 1
    return ToolPlan(rendered, StructuredOutputs(json=calls), required=True)


def tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """A finished completion's text and the OpenAI tool calls it makes: (its text, None)
    where it makes none, or was cut short before its JSON closed; (None, calls) for named
    and required calls; ("auto") the text written before the calls, and the calls."""
    if plan.parser is not None:
        parsed = plan.parser.parse(text)
        if not parsed.calls:
            return text, None
        return parsed.content, [_call(name, args, plan.parser.call_id)
                                for name, args in parsed.calls]
    calls = _forced_calls(plan, text)
    return (text, None) if calls is None else (None, calls)


def _forced_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]] | None:
    if plan.named is not None:
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return None
        return [_call(plan.named, text)]
    if not plan.required:
        return None
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]


def _call(name: str, arguments: str, new_id: Callable[[], str] = openai_call_id
          ) -> dict[str, Any]:
    return {"id": new_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}
