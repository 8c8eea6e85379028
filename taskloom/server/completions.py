"""POST /v1/completions: text or token prompts (one or many), n samples each, echo, logprobs,
streamed as server-sent events or returned whole.

`prepare_completion` (body -> engine inputs) and `completion_body` (final outputs -> response
body) need no HTTP request: the offline batch job answers its lines with them too.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from taskloom.outputs import PositionLogprobs, RequestOutput
from taskloom.sampling_params import MAX_LOGPROBS
from taskloom.server.errors import bad_request
from taskloom.server.protocol import CompletionRequest
from taskloom.server.serving import (EngineJob, ModelContext, PreparedRequest, ServingContext,
                                     make_params)
from taskloom.server.streaming import (Encoded, Envelope, collect, completion_tokens,
                                      sse_response, usage)


async def create_completion(ctx: ServingContext, body: CompletionRequest,
                            raw: Request) -> Response:
    lora = await ctx.resolve_model(body.model, body.merged_adapters)
    prepared = prepare_completion(ctx, body)
    ctx.check_capacity(len(prepared.prompts) * body.n)
    job = EngineJob(ctx, raw, "cmpl")
    await job.start(prepared.prompts, prepared.params, lora)
    if body.stream:
        return sse_response(job, _chunks(job, body))
    final = await collect(job)
    return JSONResponse(completion_body(ctx, job.id, job.created, body, final))


def prepare_completion(ctx: ModelContext, body: CompletionRequest) -> PreparedRequest:
    """Check a completions body and encode its prompts; a mistake raises a 400 APIError."""
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got "
                          f"{body.logprobs}", "logprobs")
    params = make_params(body.sampling_params, max_tokens=body.max_tokens,
                         logprobs=body.logprobs,
                         prompt_logprobs=body.logprobs if body.echo else None)
    prompts = _encode_prompts(ctx, body)
    if body.echo and body.logprobs is not None and body.stream:
        raise bad_request("echo with logprobs is not supported when streaming", "echo")
    for ids, _ in prompts:
        ctx.check_length(len(ids), body.max_tokens, "prompt")
    return PreparedRequest(prompts, params)


def _encode_prompts(ctx: ModelContext, body: CompletionRequest
                    ) -> list[tuple[list[int], str | None]]:
    prompts = body.prompts()
    if not prompts:
        raise bad_request("prompt is empty: give a string, a list of strings or token ids",
                          "prompt")
    out: list[tuple[list[int], str | None]] = []
    for i, p in enumerate(prompts):
        label = f"prompt {i}" if len(prompts) > 1 else "prompt"
        if isinstance(p, str):
            if not p:
                raise bad_request(f"{label} is empty: give at least one character", "prompt")
            out.append((ctx.tokenizer_or_error().encode(p), p))
            continue
        if not p:
            raise bad_request(f"{label} is empty: give at least one token id", "prompt")
        bad = next((t for t in p if not 0 <= t < ctx.vocab_size), None)
        if bad is not None:
            raise bad_request(f"{label} has token id {bad}, outside the vocabulary "
                              f"(0 to {ctx.vocab_size - 1})", "prompt")
        out.append((list(p), None))
    return out


def _prompt_text(ctx: ModelContext, out: RequestOutput) -> str:
    """The prompt as text, for echo: as given, or decoded when it was given as token ids."""
    if out.prompt is not None:
        return out.prompt
    if ctx.tokenizer is None:
        return ""
    return ctx.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)


def _choice(index: int, text: str, logprobs: dict | None, finish: str | None
            ) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _with_token_ids(choice: dict[str, Any], prompt_ids: list[int] | None,
                    token_ids: list[int]) -> dict[str, Any]:
    """A choice with `return_token_ids`' fields: the prompt's ids (whole responses, and a
    stream's first chunk of each choice) and the generated ids (a chunk's: the new ones)."""
    if prompt_ids is not None:
        choice["prompt_token_ids"] = prompt_ids
    choice["token_ids"] = token_ids
    return choice


def completion_body(ctx: ModelContext, response_id: str, created: int, body: CompletionRequest,
                    final: list[RequestOutput]) -> dict[str, Any]:
    """The JSON body of a whole (non-streamed) completion: `final` holds each prompt's
    finished output, in prompt order."""
    choices = []
    for i, out in enumerate(final):
        for c in out.outputs:
            prefix = _prompt_text(ctx, out) if body.echo else ""
            lp = None
            if body.logprobs is not None:
                entries = (out.prompt_logprobs or []) if body.echo else []
                tokens = (out.prompt_token_ids if body.echo else []) + c.token_ids
                lp = completion_logprobs(entries + (c.logprobs or []), tokens, 0,
                                         ctx.token_text)
            choice = _choice(i * body.n + c.index, prefix + c.text, lp, c.finish_reason)
            if body.return_token_ids:
                choice = _with_token_ids(choice, out.prompt_token_ids, c.token_ids)
            choices.append(choice)
    num_prompt_tokens = sum(len(out.prompt_token_ids) for out in final)
    return {"id": response_id, "object": "text_completion", "created": created,
            "model": ctx.response_model(body.model), "choices": choices,
            "usage": usage(num_prompt_tokens, completion_tokens(final))}


async def _chunks(job: EngineJob, body: CompletionRequest
                  ) -> AsyncIterator[dict[str, Any] | Encoded]:
    envelope = Envelope({"id": job.id, "object": "text_completion", "created": job.created,
                         "model": job.ctx.response_model(body.model)}, body.include_usage)
    offsets: dict[tuple[int, int], int] = {}    # text sent per (prompt, sample)
    async for i, out in job.outputs():
        for c in out.outputs:              # only the new part of the samples that changed
            key = (i, c.index)
            text = c.text
            if body.echo and key not in offsets:
                text = _prompt_text(job.ctx, out) + text
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(c.logprobs or [], c.token_ids, offsets.get(key, 0),
                                         job.ctx.token_text)
            first = key not in offsets
            offsets[key] = offsets.get(key, 0) + len(text)
            if text or c.finish_reason or (lp and lp["tokens"]) or (
                    body.return_token_ids and c.token_ids):
                choice = _choice(i * body.n + c.index, text, lp, c.finish_reason)
                if body.return_token_ids:
                    choice = _with_token_ids(choice, out.prompt_token_ids if first else None,
                                             c.token_ids)
                yield envelope.encode([choice])
    if body.include_usage:
        yield {**envelope.chunk([]),
               "usage": usage(job.num_prompt_tokens, job.num_output_tokens)}


def completion_logprobs(entries: list[PositionLogprobs | None], token_ids: list[int],
                        offset: int, token_text: Callable[[int], str]) -> dict[str, Any]:
    """The legacy completions logprobs object for these positions, text offsets from `offset`.
    An entry of None (the first prompt token, which has no context) has logprob null."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid) if entry else None
        text = chosen.decoded_token if chosen else token_text(tid)
        tokens.append(text)
        token_lps.append(chosen.logprob if chosen else None)
        tops.append({lp.decoded_token: lp.logprob for lp in entry.values()} if entry else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}
