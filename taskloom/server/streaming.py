"""Delivering an EngineJob: as server-sent events (`data: {json}` each, `data: [DONE]` last)
or collected into one final output per prompt."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.sse import EventSourceResponse

from taskloom.outputs import RequestOutput, add_delta
from taskloom.server.errors import APIError
from taskloom.server.serving import ClientDisconnected, EngineJob

logger = logging.getLogger(__name__)

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Encoded(str):
    """A chunk already encoded as JSON."""


class Envelope:
    """The fields every chunk of one stream repeats (id, object, created, model; usage null
    when the stream ends with a usage chunk), encoded once: a chunk is then encoded as the
    envelope around its choices, the very string json.dumps gives for the whole chunk. Every
    streamed token pays for a chunk's encoding on the server's event loop."""

    def __init__(self, fields: dict[str, Any], include_usage: bool) -> None:
        self.fields = fields
        self.include_usage = include_usage
        self._head = json.dumps(fields, ensure_ascii=False)[:-1] + ', "choices": '
        self._tail = ', "usage": null}' if include_usage else "}"

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A chunk as a dict, for one that carries more fields."""
        return {**self.fields, "choices": choices,
                **({"usage": None} if self.include_usage else {})}

    def encode(self, choices: list[dict[str, Any]]) -> Encoded:
        return Encoded(self._head + json.dumps(choices, ensure_ascii=False) + self._tail)


def sse_response(job: EngineJob, chunks: AsyncIterator[dict[str, Any] | Encoded]
                 ) -> EventSourceResponse:
    """Stream `chunks` (dicts, or already `Encoded`) as `data: {json}` events, then
    `data: [DONE]`; an engine failure is sent as an error event. However the stream ends, the
    job is closed (aborted if unfinished).
    """
    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield _event(chunk if isinstance(chunk, Encoded)
                             else json.dumps(chunk, ensure_ascii=False))
        except ClientDisconnected:
            return
        except APIError as e:
            yield _event(json.dumps(e.body()))
        finally:
            job.close()
        yield _event("[DONE]")

    return EventSourceResponse(events(), headers=_HEADERS)


def _event(data: str) -> bytes:
    """One `data:` event; `data` is one line (JSON escapes every newline in a string)."""
    return b"data: " + data.encode() + b"\n\n"


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
