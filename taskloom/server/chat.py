"""POST /v1/chat/completions: a conversation rendered with the model's chat template, n samples,
logprobs with top alternatives, streamed as server-sent events or returned whole.

`prepare_chat` (body -> engine input) and `chat_body` (final output -> response body) need no
HTTP request: the offline batch job answers its lines with them too.
"""
from __future__ import annotations

import dataclasses

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError

from taskloom.outputs import PositionLogprobs, RequestOutput
from taskloom.sampling_params import MAX_LOGPROBS
from taskloom.server.errors import bad_request
from taskloom.server.protocol import ChatCompletionRequest
from taskloom.server.serving import (EngineJob, ModelContext, PreparedRequest, ServingContext,
                                     make_params)
from taskloom.server.streaming import (Encoded, Envelope, collect, completion_tokens,
                                      sse_response, usage)
from taskloom.server.tool_parsers import openai_call_id
from taskloom.server.tools import ToolPlan, plan_tools, tool_calls


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest,
                                 raw: Request) -> Response:
    lora = await ctx.resolve_model(body.model, body.merged_adapters)
    prepared = prepare_chat(ctx, body)
    ctx.check_capacity(body.n)
    job = EngineJob(ctx, raw, "chatcmpl")
    await job.start(prepared.prompts, prepared.params, lora)
    if body.stream:
        return sse_response(job, _chunks(job, body))
    final = await collect(job)
    return JSONResponse(chat_body(ctx, job.id, job.created, body, final[0]))


def prepare_chat(ctx: ModelContext, body: ChatCompletionRequest) -> PreparedRequest:
    """Check a chat body and render its messages with the chat template into one prompt; a
    mistake raises a 400 APIError."""
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got "
                          f"{body.top_logprobs}", "top_logprobs")
    max_tokens = body.max_output_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{param} must be >= 1, got {max_tokens}", param)
    plan = plan_tools(body, ctx.tool_call_parser)
    params = make_params(body.sampling_params, max_tokens=max_tokens,
                         logprobs=body.num_logprobs, tool_constraint=plan.structured)
    if plan.parser is not None and plan.parser.special_tokens:   # its tag is one
        params = dataclasses.replace(params, skip_special_tokens=False)
    ids = render_chat(ctx, body.conversation(), plan.tools, body.add_generation_prompt,
                      body.continue_final_message)
    ctx.check_length(len(ids), max_tokens, "messages")
    return PreparedRequest([(ids, None)], params)


def render_chat(ctx: ModelContext, conversation: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None, add_generation_prompt: bool,
                continue_final_message: bool, add_special_tokens: bool = False) -> list[int]:
    """The prompt's token ids of a conversation (the template writes its special tokens;
    `add_special_tokens` adds the model's own BOS/EOS on top, as /tokenize may ask); a 400
    APIError naming what the chat template could not render."""
    if continue_final_message and add_generation_prompt:
        raise bad_request("continue_final_message needs add_generation_prompt set to false: "
                          "the first continues the last message, the second opens a new "
                          "assistant turn", "continue_final_message")
    tokenizer = ctx.tokenizer_or_error()
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt, tools,
                                             continue_final_message=continue_final_message)
    except (TemplateError, ValueError) as e:
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def chat_body(ctx: ModelContext, response_id: str, created: int, body: ChatCompletionRequest,
              out: RequestOutput) -> dict[str, Any]:
    """The JSON body of a whole (non-streamed) chat completion from its finished output."""
    plan = plan_tools(body, ctx.tool_call_parser)
    choices = []
    for c in out.outputs:
        message, finish = _message(plan, c.text, c.finish_reason)
        choices.append({
            "index": c.index, "message": message,
            "logprobs": chat_logprobs(c.logprobs, c.token_ids, body.num_logprobs or 0)
            if body.logprobs else None,
            "finish_reason": finish,
            **({"token_ids": c.token_ids} if body.return_token_ids else {})})
    response = {"id": response_id, "object": "chat.completion", "created": created,
                "model": ctx.response_model(body.model), "choices": choices,
                "usage": usage(len(out.prompt_token_ids), completion_tokens([out]))}
    if body.return_token_ids:
        response["prompt_token_ids"] = out.prompt_token_ids
    return response


async def _chunks(job: EngineJob, body: ChatCompletionRequest
                  ) -> AsyncIterator[dict[str, Any] | Encoded]:
    envelope = Envelope({"id": job.id, "object": "chat.completion.chunk",
                         "created": job.created, "model": job.ctx.response_model(body.model)},
                        body.include_usage)
    plan = plan_tools(body, job.ctx.tool_call_parser)
    calls = _StreamedCalls(plan, body.n)
    for index in range(body.n):
        first = envelope.chunk([_choice(index, calls.opening(), None, None)])
        if body.return_token_ids:
            first["prompt_token_ids"] = job.prompt_token_ids[0]
        yield first
    async for _, out in job.outputs():
        for c in out.outputs:              # only the new part of the samples that changed
            lp = None
            if body.logprobs:
                lp = chat_logprobs(c.logprobs, c.token_ids, body.num_logprobs or 0)
            if c.text or c.finish_reason or (lp and lp["content"]) or (
                    body.return_token_ids and c.token_ids):
                finish = c.finish_reason
                if plan.calls_tools:
                    delta, finish = calls.delta(c.index, c.text, finish)
                else:
                    delta = {"content": c.text} if c.text else {}
                if not (delta or finish or (lp and lp["content"]) or body.return_token_ids):
                    continue        # held back: calls not closed yet, or maybe a call's tag
                choice = _choice(c.index, delta, lp, finish)
                if body.return_token_ids:
                    choice["token_ids"] = c.token_ids
                yield envelope.encode([choice])
    if body.include_usage:
        yield {**envelope.chunk([]),
               "usage": usage(job.num_prompt_tokens, job.num_output_tokens)}


class _StreamedCalls:
    """The deltas of streamed tool calls. A named function's call opens in the first chunk
    and its arguments follow as the completion's text arrives; "required" calls (a JSON list
    until it closes) come whole when the completion ends; with "auto", the text streams up
    to where a call's opening tag may start, and the calls come whole at the end."""

    def __init__(self, plan: ToolPlan, n: int) -> None:
        self.plan = plan
        self.buffers = [""] * n
        self.sent = [0] * n     # "auto": the characters of text already streamed

    def opening(self) -> dict[str, Any]:
        if self.plan.named is not None:
            return {"role": "assistant", "content": None, "tool_calls": [{
                "index": 0, "id": openai_call_id(), "type": "function",
                "function": {"name": self.plan.named, "arguments": ""}}]}
        return {"role": "assistant", "content": None if self.plan.required else ""}

    def delta(self, index: int, text: str, finish: str | None
              ) -> tuple[dict[str, Any], str | None]:
        """A choice's delta for its new text, and its finish reason."""
        plan = self.plan
        if plan.named is not None:
            args = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
            return (args if text else {}), finish
        self.buffers[index] += text
        buffer = self.buffers[index]
        if finish is None:
            if plan.parser is None:
                return {}, None
            safe = plan.parser.safe_prefix(buffer, self.sent[index])
            delta = {"content": buffer[self.sent[index]:safe]} if safe > self.sent[index] \
                else {}
            self.sent[index] = max(self.sent[index], safe)
            return delta, None
        content, calls = tool_calls(plan, buffer)
        if calls is None:       # no calls, or cut short before they closed: the text
            rest = buffer[self.sent[index]:]
            return ({"content": rest} if rest else {}), finish
        delta: dict[str, Any] = {"tool_calls": [{"index": i, **call}
                                                for i, call in enumerate(calls)]}
        if plan.parser is None:
            return delta, finish
        before = buffer[self.sent[index]:plan.parser.safe_prefix(buffer, self.sent[index])]
        if before:      # the text before the calls that no chunk has carried yet
            delta["content"] = before
        return delta, "tool_calls"


def _message(plan: ToolPlan, text: str, finish: str | None
             ) -> tuple[dict[str, Any], str | None]:
    """A whole completion's message (its tool calls, where it makes some, else its text)
    and finish reason ("tool_calls" where the model chose to call: "auto")."""
    content, calls = tool_calls(plan, text) if plan.calls_tools else (text, None)
    if calls is None:
        return {"role": "assistant", "content": text}, finish
    return ({"role": "assistant", "content": content, "tool_calls": calls},
            "tool_calls" if plan.parser is not None else finish)


def _choice(index: int, delta: dict, logprobs: dict | None, finish: str | None
            ) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def chat_logprobs(entries: list[PositionLogprobs] | None, token_ids: list[int],
                  top: int) -> dict[str, Any]:
    """The chat logprobs object: each chosen token with its logprob, bytes and the `top` most
    likely alternatives."""
    content = []
    for tid, entry in zip(token_ids, entries or []):
        chosen = entry[tid]
        ranked = sorted((lp for lp in entry.values() if lp.rank <= top), key=lambda x: x.rank)
        content.append({**_token(chosen.decoded_token, chosen.logprob),
                        "top_logprobs": [_token(lp.decoded_token, lp.logprob)
                                         for lp in ranked]})
    return {"content": content}


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
