"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Everything a client can get wrong maps to a 4xx with a message that names the problem:
validation errors of the body (400), unknown models (404), missing or wrong API keys (401), a
full queue (429). A 500 means the server could not do its part: a bug in taskloom, or a
loaded adapter whose files can no longer be read; never something the client sent.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error to return to the client as is."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body())


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, type, param, code))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """One readable sentence for pydantic's errors (a RequestValidationError's or a
    ValidationError's `errors()`), and the parameter they concern."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}"
                         .rstrip(": "))
            continue
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object "
                         "(send it with Content-Type: application/json)")
            continue
        name = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{name}: {err.get('msg', 'invalid value')}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request body", param


def install_error_handlers(app: FastAPI, on_client_error: Callable[[], None]) -> None:
    """Route every error raised while serving a request into OpenAI's error shape;
    `on_client_error` is called for each request refused with a 4xx."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if 400 <= exc.status < 500:
            on_client_error()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        on_client_error()
        message, param = validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase
        return error_response(exc.status_code, detail, kind)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error while serving a request")
        return error_response(500, f"internal server error: {type(exc).__name__}",
                              "internal_error")
