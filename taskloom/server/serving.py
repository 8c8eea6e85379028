"""What both OpenAI endpoints share: checks before the engine (ModelContext, which the offline
batch job uses too), and the EngineJob that carries the engine requests of one HTTP request
(one per prompt) from admission to the last output. Its engine requests are DELTA requests
(taskloom.outputs): each step's output holds only what is new, so nothing the server already
has is copied again; a whole response is folded together from them (`streaming.collect`).

An EngineJob watches its HTTP connection: when the client goes away, while queued or mid-
stream, every engine request of the job is aborted at once, so its KV blocks are free within
one engine step whether or not anything is being sent at that moment.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from taskloom.engine.client import EngineClient, EngineDeadError, OutputStream
from taskloom.lora.registry import LoRARegistry
from taskloom.lora.request import LoRARequest
from taskloom.outputs import OutputKind, RequestOutput
from taskloom.sampling_params import InvalidParameter, SamplingParams
from taskloom.server.errors import APIError, bad_request
from taskloom.server.metrics import RequestTimer, ServerMetrics
from taskloom.server.protocol import MergedAdapters
from taskloom.server.tool_parsers import ToolCallParser
from taskloom.tokenizer.tokenizer import Tokenizer


@dataclass
class ModelContext:
    """What turning a request body into engine requests and an engine output back into a
    response body needs: the model's name, tokenizer and limits. No engine client, so the
    offline batch job (taskloom/batch.py) validates and answers exactly as the server does."""

    tokenizer: Tokenizer | None
    model_name: str
    max_model_len: int
    vocab_size: int
    loras: LoRARegistry | None = field(default=None, kw_only=True)  # None: no LoRA support
    # finds the calls a model writes for tool_choice "auto" (None: "auto" is refused)
    tool_call_parser: ToolCallParser | None = field(default=None, kw_only=True)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        """Reject what the model's context cannot hold, with the token counts."""
        total = num_prompt_tokens + (max_tokens or 1)
        if num_prompt_tokens >= self.max_model_len or total > self.max_model_len:
            asked = f"{num_prompt_tokens} in the {param}" + (
                f", {max_tokens} in the completion" if max_tokens else "")
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {total} tokens ({asked}). Please reduce the length of the "
                f"{param} or the completion.", param, "context_length_exceeded")

    def token_text(self, token_id: int) -> str:
        """One token's text (its id in brackets when the model has no tokenizer)."""
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def response_model(self, model: str) -> str:
        """The base model's name, or the adapter's when the request named one."""
        return model if self.adapter(model) is not None else self.model_name

    def adapter(self, model: str) -> LoRARequest | None:
        """The loaded adapter named `model`, if any."""
        if self.loras is None or model == self.model_name:
            return None
        try:
            return self.loras.resolve(model)
        except KeyError:
            return None

    def tokenizer_or_error(self) -> Tokenizer:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer (random weights): send token ids")
        return self.tokenizer


@dataclass
class ServingContext(ModelContext):
    """Everything the endpoints need, fixed when the server starts."""

    client: EngineClient
    metrics: ServerMetrics
    max_queue: int | None = None

    async def resolve_model(self, model: str, merged: MergedAdapters | None
                            ) -> LoRARequest | None:
        """The adapter a request is served with (None: the base model): `model` names the
        base model or a loaded adapter; `merged_adapters` (with the base model) a merge of
        loaded adapters, loaded once and cached by recipe. 404 / 400 naming the problem."""
        adapter = self.adapter(model)
        if adapter is None and model != self.model_name:
            names = [self.model_name] + [a.name for a in (self.loras.adapters if self.loras
                                                           else [])]
            raise APIError(404, f"The model `{model}` does not exist. This server serves "
                                f"{', '.join(f'`{n}`' for n in names)} (see GET /v1/models).",
                           "invalid_request_error", "model", "model_not_found")
        if merged is None:
            return adapter
        if adapter is not None or self.loras is None:
            raise bad_request("merged_adapters needs `model` to name the base model, on a "
                              "server started with LoRA support", "merged_adapters")
        return await self._merge(self.loras, merged)

    async def _merge(self, loras: LoRARegistry, m: MergedAdapters) -> LoRARequest:
        try:
            lora, new = loras.merged(m.adapters, m.method, m.density, m.majority_sign_method,
                                     m.seed)
        except (KeyError, ValueError) as e:
            raise bad_request(f"merged_adapters: {e.args[0]}", "merged_adapters") from None
        if new:
            try:
                await self.client.add_lora(lora)
            except ValueError as e:
                loras.discard(lora)
                raise bad_request(f"merged_adapters: {e}", "merged_adapters") from None
        return lora

    def check_capacity(self, num_seqs: int) -> None:
        if self.max_queue is not None and self.client.num_queued + num_seqs > self.max_queue:
            raise APIError(429, f"The server is busy: {self.client.num_queued} sequences are "
                                f"already waiting (--max-queue {self.max_queue}). Retry later.",
                           "rate_limit_error", None, "queue_full")
        if not self.client.alive:
            raise APIError(503, "The engine is not running.", "service_unavailable")


@dataclass
class PreparedRequest:
    """A checked request body as engine inputs: (token ids, text or None) per prompt, and the
    sampling parameters every prompt shares."""

    prompts: list[tuple[list[int], str | None]]
    params: SamplingParams


def new_response_id(prefix: str) -> str:
    """A fresh response id, e.g. `cmpl-<32 hex>` or `chatcmpl-<32 hex>` as OpenAI's."""
    return f"{prefix}-{uuid.uuid4().hex}"


def make_params(build: callable, **kwargs: object) -> SamplingParams:  # type: ignore[valid-type]
    """SamplingParams from a request body; a bad value becomes a 400 naming the parameter."""
    try:
        return build(**kwargs)
    except InvalidParameter as e:
        raise bad_request(str(e), e.param) from None


def refused(index: int, num_prompts: int, error: ValueError) -> APIError:
    """The 400 for a prompt the engine refused to queue (it could never run)."""
    label = f"prompt {index}: " if num_prompts > 1 else ""
    param = error.param if isinstance(error, InvalidParameter) else "prompt"
    return bad_request(f"{label}{error}", param)


def request_failed(message: str, index: int, num_prompts: int) -> APIError:
    """The 500 for a prompt the engine took but could not serve (an adapter whose files can
    no longer be read): the server's fault, not the client's, and it says what broke."""
    label = f"prompt {index}: " if num_prompts > 1 else ""
    return APIError(500, f"{label}{message}", "server_error")


class ClientDisconnected(Exception):
    """The HTTP client went away before the job finished."""


@dataclass
class _Entry:
    request_id: str
    timer: RequestTimer
    finished: bool = False


class EngineJob:
    """The engine requests of one HTTP request: one per prompt, outputs on one queue."""

    def __init__(self, ctx: ServingContext, raw: Request, prefix: str) -> None:
        self.ctx = ctx
        self.raw = raw
        self.id = new_response_id(prefix)
        self.created = int(time.time())
        # every prompt's outputs; a prompt's unread DELTA outputs join (see OutputStream)
        self.queue = OutputStream()
        self.entries: list[_Entry] = []
        self.prompt_token_ids: list[list[int]] = []   # per prompt admitted
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self._watcher: asyncio.Task | None = None

    async def start(self, prompts: list[tuple[list[int], str | None]],
                    params: SamplingParams, lora: LoRARequest | None = None) -> None:
        """Admit every prompt (served with adapter `lora`), or none: a refusal aborts those
        already added (400)."""
        self._watcher = asyncio.ensure_future(self._watch_disconnect())
        for i, (ids, text) in enumerate(prompts):
            rid = f"{self.id}-{i}"
            entry = _Entry(rid, self.ctx.metrics.timer())
            try:
                await self.ctx.client.add(rid, ids, params, text, stream=self.queue, lora=lora,
                                          output_kind=OutputKind.DELTA)
            except ValueError as e:
                self.close()
                raise refused(i, len(prompts), e) from None
            except EngineDeadError as e:
                self.close()
                raise APIError(503, str(e), "service_unavailable") from None
            entry.timer.admitted(len(ids))
            self.prompt_token_ids.append(ids)
            self.num_prompt_tokens += len(ids)
            self.entries.append(entry)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (prompt index, DELTA output) until every prompt finished."""
        index = {e.request_id: i for i, e in enumerate(self.entries)}
        remaining = len(self.entries)
        while remaining:
            item = await self.queue.get()
            if isinstance(item, ClientDisconnected):
                raise item
            if isinstance(item, BaseException):
                raise APIError(503, str(item), "service_unavailable")
            i = index[item.request_id]
            entry = self.entries[i]
            new_tokens = sum(len(c.token_ids) for c in item.outputs)
            self.num_output_tokens += new_tokens
            entry.timer.tokens(new_tokens)
            if item.finished:
                entry.finished = True
                entry.timer.done(next((c.finish_reason for c in item.outputs
                                       if c.finish_reason), "stop"))
                remaining -= 1
            if item.error is not None:
                raise request_failed(item.error, i, len(self.entries))
            yield i, item

    def close(self) -> None:
        """Abort whatever has not finished and stop watching the connection."""
        for entry in self.entries:
            if not entry.finished:
                entry.finished = True
                self.ctx.client.abort(entry.request_id)
                entry.timer.done("abort")
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch_disconnect(self) -> None:
        while (await self.raw.receive())["type"] != "http.disconnect":
            pass
        self._watcher = None   # this task is ending: close() must not cancel it
        self.close()
        self.queue.put_nowait(ClientDisconnected())
