"""POST /tokenize and /detokenize, as vLLM has them: a prompt or a conversation to the token
ids the engine would be given (the chat rendered as /v1/chat/completions renders it, tools,
prefill and all), and token ids back to text. What a client needs to count a prompt against
the context, or to send token ids itself.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError

from taskloom.server.chat import render_chat
from taskloom.server.errors import bad_request, validation_message
from taskloom.server.protocol import (DetokenizeRequest, TokenizeChatRequest,
                                     TokenizeCompletionRequest)
from taskloom.server.serving import ServingContext


def install_tokenize_endpoints(app: FastAPI, ctx: ServingContext, auth: list) -> None:
    """POST /tokenize (a `prompt`, or `messages`) and POST /detokenize (`tokens`)."""

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(raw: Request) -> dict[str, Any]:
        data = await _json_object(raw)
        kind = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
        body = _validate(kind, data)
        await _check_model(ctx, body.model)
        tokenizer = ctx.tokenizer_or_error()
        if isinstance(body, TokenizeChatRequest):
            tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
            ids = render_chat(ctx, body.conversation(), tools, body.add_generation_prompt,
                              body.continue_final_message, body.add_special_tokens)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.max_model_len,
                               "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(raw: Request) -> dict[str, str]:
        body = _validate(DetokenizeRequest, await _json_object(raw))
        await _check_model(ctx, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < ctx.vocab_size), None)
        if bad is not None:
            raise bad_request(f"tokens has token id {bad}, outside the vocabulary (0 to "
                              f"{ctx.vocab_size - 1})", "tokens")
        return {"prompt": ctx.tokenizer_or_error().decode(body.tokens,
                                                          skip_special_tokens=False)}


async def _json_object(raw: Request) -> dict[str, Any]:
    try:
        data = json.loads(await raw.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def _validate(kind: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise bad_request(message, param) from None


async def _check_model(ctx: ServingContext, model: str | None) -> None:
    """A named model must be served here (the base model or a loaded adapter: one tokenizer
    for all); a 404 otherwise."""
    if model is not None:
        await ctx.resolve_model(model, None)
