"""What every request passes first: the API key, the body size limit, and errors in OpenAI's shape.

:class:`Gate` is plain ASGI middleware (no body buffering): it answers 401 before any body
is read, 413 from ``Content-Length`` alone when it says too much, and counts the bytes as
they arrive for bodies without one (chunked uploads). It is also the last resort that turns
an unexpected exception into a logged 500 with an OpenAI-shaped body.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.wire import ApiError, error_body
from shared.errors import AudioError, ConfigError, ModelNotFound, MoiError

log = logging.getLogger("moi.http")
OPEN_PATHS = frozenset({"/health"})


def as_api_error(exc: BaseException) -> ApiError:
    """The status and OpenAI error body for any exception; unexpected ones are logged."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HTTPException):
        return ApiError(exc.status_code, str(exc.detail))
    if isinstance(exc, AudioError):
        return ApiError(400, str(exc), param="file", code="invalid_audio")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), code="invalid_value")
    if isinstance(exc, ModelNotFound):
        return ApiError(503, str(exc), code="model_not_found")
    if isinstance(exc, MoiError):
        return ApiError(500, str(exc))
    log.error("unexpected error", exc_info=exc)
    return ApiError(500, f"internal server error ({type(exc).__name__}); the server log has the details")


def json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 with OpenAI's body: every problem in ``message``, the first one's ``param``."""
    parts, param = [], None
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        param = param or loc or None
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    body = error_body("; ".join(parts) or "invalid request", "invalid_request_error", param, "invalid_value")
    return JSONResponse(body, status_code=422)


class Gate:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if (
            self.expected
            and scope["path"] not in OPEN_PATHS
            and not secrets.compare_digest(given, self.expected)
        ):
            err = ApiError(
                401,
                "missing or incorrect API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await json_error(err)(scope, receive, send)
            return
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_body:
            await json_error(self._too_large(int(length)))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise self._too_large(received)  # → the app's handler answers 413
            return message

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception as exc:
            if started:
                raise  # mid-response: let the server cut the connection so the client sees a broken body
            await json_error(as_api_error(exc))(scope, receive, send)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(
            413,
            f"the request body is at least {size} bytes; the limit is {self.max_body} bytes",
            param="file",
            code="file_too_large",
            headers={"Connection": "close"},
        )


async def any_error_handler(request: Any, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    return json_error(as_api_error(exc))
