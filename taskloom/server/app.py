"""The HTTP app: OpenAI endpoints, health, models, Prometheus metrics and the chat page, and
vLLM's endpoints for loading / unloading LoRA adapters at runtime and for tokenizing.

`build_app` wires an engine, through its EngineClient (a thread of this process or a process
of its own, taskloom.engine.core_process), into a FastAPI app; the client starts and stops
with the app's lifespan.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from taskloom.engine.client import EngineClient
from taskloom.lora.registry import LoRARegistry
from taskloom.server.chat import create_chat_completion
from taskloom.server.completions import create_completion
from taskloom.server.errors import APIError, install_error_handlers
from taskloom.server.metrics import ServerMetrics
from taskloom.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                     LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest)
from taskloom.server.serving import ServingContext
from taskloom.server.tokenize import install_tokenize_endpoints
from taskloom.server.tool_parsers import tool_call_parser_named


def build_app(client: EngineClient, model_name: str, api_key: str | None = None,
              max_queue: int | None = None, tool_call_parser: str | None = None) -> FastAPI:
    """An app serving the engine behind `client` under `model_name`. `api_key` guards
    /v1/*, /tokenize and /detokenize; `max_queue` bounds the sequences waiting for admission
    (429 beyond it); the adapters requests may pick by `model` are the client's
    `info.loras` (None: the engine serves none); `tool_call_parser` (a name in
    TOOL_CALL_PARSERS) finds the calls the model writes for tool_choice "auto"."""
    info = client.info
    loras = info.loras
    ctx = ServingContext(tokenizer=info.tokenizer, model_name=model_name,
                         max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                         client=client, metrics=ServerMetrics(client, model_name),
                         max_queue=max_queue, loras=loras,
                         tool_call_parser=tool_call_parser_named(tool_call_parser))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            client.stop()

    app = FastAPI(title="taskloom", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app, on_client_error=lambda: ctx.metrics.finished("rejected"))
    auth = [Depends(_api_key_check(api_key))]
    created = int(time.time())

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await create_completion(ctx, body, raw)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(ctx, body, raw)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "taskloom",
                "root": model_name, "parent": None, "max_model_len": ctx.max_model_len}
        adapters = [{**base, "id": a.name, "root": a.path, "parent": model_name}
                    for a in (loras.adapters if loras else [])]
        return {"object": "list", "data": [base] + adapters}

    install_lora_endpoints(app, ctx, auth)
    install_tokenize_endpoints(app, ctx, auth)

    @app.get("/health")
    async def health() -> Response:
        if not client.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    page = resources.files("taskloom.server").joinpath("static/chat.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def install_lora_endpoints(app: FastAPI, ctx: ServingContext, auth: list) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM has them."""

    def registry() -> LoRARegistry:
        if ctx.loras is None:
            raise APIError(400, "This server was started without LoRA support; start it with "
                                "--enable-lora or --lora NAME=PATH.", "invalid_request_error")
        return ctx.loras

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        loras = registry()
        if body.lora_name == ctx.model_name:
            raise APIError(400, f"The name {body.lora_name!r} is the base model's.",
                           "invalid_request_error", "lora_name")
        try:
            lora = loras.reserve(body.lora_name, body.lora_path)
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request_error", "lora_name") from None
        try:
            await ctx.client.add_lora(lora)
        except ValueError as e:
            loras.discard(lora)
            raise APIError(400, str(e), "invalid_request_error", "lora_path") from None
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                        media_type="text/plain")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        loras = registry()
        try:
            ids = loras.remove(body.lora_name)
        except KeyError as e:
            raise APIError(404, e.args[0], "invalid_request_error", "lora_name",
                           "model_not_found") from None
        await ctx.client.remove_loras(ids)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                        media_type="text/plain")


def _api_key_check(api_key: str | None):  # -> a FastAPI dependency
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key. Send it in the Authorization "
                                "header as `Bearer YOUR_KEY`.", "invalid_request_error", None,
                           "missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                   api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "invalid_request_error", None,
                           "invalid_api_key")
    return check
