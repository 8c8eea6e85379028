"""Delivering an EngineJob: as server-sent events (FastAPI's SSE encoding, `data: [DONE]`
last) or collected into one final output per prompt."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.sse import EventSourceResponse, format_sse_event

from taskloom.outputs import RequestOutput, add_delta
from taskloom.server.errors import APIError
from taskloom.server.serving import ClientDisconnected, EngineJob

logger = logging.getLogger(__name__)

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(job: EngineJob, chunks: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    """Stream `chunks` as `data: {json}` events, then `data: [DONE]`; an engine failure is
    sent as an error event. However the stream ends, the job is closed (aborted if unfinished).
    """
    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield _event(json.dumps(chunk, ensure_ascii=False))
        except ClientDisconnected:
            return
        except APIError as e:
            yield _event(json.dumps(e.body()))
        finally:
            job.close()
        yield _event("[DONE]")

    return EventSourceResponse(events(), headers=_HEADERS)


def _event(data: str) -> bytes:
    return format_sse_event(data_str=data)


async def collect(job: EngineJob) -> list[RequestOutput]:
    """The whole output of every prompt of the job, in prompt order (folded from deltas)."""
    final: list[RequestOutput | None] = [None] * len(job.entries)
    try:
        async for i, out in job.outputs():
            final[i] = add_delta(final[i], out)
    except ClientDisconnected:
        raise APIError(499, "the client closed the connection", "client_closed") from None
    finally:
        job.close()
    return final  # type: ignore[return-value]


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def completion_tokens(final: list[RequestOutput]) -> int:
    """Tokens generated for whole outputs, every sample counted."""
    return sum(len(c.token_ids) for out in final for c in out.outputs)
