"""What every request passes first: the Host and Origin, the API key, the body size limit, and
errors in OpenAI's shape.

:class:`Gate` is plain ASGI middleware (no body buffering). With ``hosts`` set (the web view,
whose page can start the microphone), a request or WebSocket whose ``Host`` is not one of them
is refused (403 / close 1008): a page on a DNS-rebinding domain cannot reach it; and whatever
``Origin`` a browser sends must be the server itself. It answers 401 before any body is read,
413 from ``Content-Length`` alone when it says too much, and counts the bytes as they arrive for
bodies without one (chunked uploads), stopping at the limit. It is also the last resort that
turns an unexpected exception into a logged 500 with an OpenAI-shaped body.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any
from urllib.parse import urlsplit

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.wire import ApiError, error_body
from shared.errors import AudioError, AudioTooLong, ConfigError, ContextTooLong, ModelNotFound, MoiError

log = logging.getLogger("moi.http")
OPEN_PATHS = frozenset({"/health"})


def as_api_error(exc: BaseException) -> ApiError:
    """The status and OpenAI error body for any exception; unexpected ones are logged."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HTTPException):  # e.g. 405 with its Allow header, which must survive
        return ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    if isinstance(exc, AudioTooLong):
        return ApiError(400, str(exc), param="file", code="audio_too_long")
    if isinstance(exc, AudioError):
        return ApiError(400, str(exc), param="file", code="invalid_audio")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), code="invalid_value")
    if isinstance(exc, ContextTooLong):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ModelNotFound):
        return ApiError(503, str(exc), code="model_not_found")
    if isinstance(exc, MoiError):
        return ApiError(500, str(exc))
    log.error("unexpected error", exc_info=exc)
    return ApiError(500, f"internal server error ({type(exc).__name__}); the server log has the details")


def json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """A body that does not validate: a 400 (as OpenAI answers it, not FastAPI's 422) with
    OpenAI's body: every problem in ``message``, the first one's ``param``."""
    parts, param = [], None
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        param = param or loc or None
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    body = error_body("; ".join(parts) or "invalid request", "invalid_request_error", param, "invalid_value")
    return JSONResponse(body, status_code=400)


def _hostname(netloc: str) -> str:
    """``host`` of ``host:port`` (``[::1]:8080`` → ``::1``), lower-case."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def bearer_matches(header: bytes, key: str) -> bool:
    """``Authorization: Bearer <key>``, the scheme in any case (RFC 7235), the key exactly."""
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


class Gate:
    def __init__(
        self, app: ASGIApp, api_key: str | None, max_body: int, hosts: frozenset[str] | None = None
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body
        self.hosts = None if hosts is None else frozenset(h.lower().strip("[]") for h in hosts)

    def _foreign(self, headers: dict[bytes, bytes]) -> str | None:
        """Why this request may not reach the app (a foreign Host or Origin), or None."""
        if self.hosts is None:
            return None
        host = headers.get(b"host", b"").decode("latin-1")
        if _hostname(host) not in self.hosts:
            return f"Host {host!r} is not this server's: open it as http://127.0.0.1 (or the --host it was given)"
        origin = headers.get(b"origin")
        if origin is not None and urlsplit(origin.decode("latin-1")).netloc.lower() != host.lower():
            return "requests from other sites are refused (this page can start your microphone)"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        why = self._foreign(headers)
        if why is not None:
            if scope["type"] == "websocket":
                await receive()  # the handshake's websocket.connect, then the refusal
                await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
            else:
                await json_error(ApiError(403, why, code="forbidden_host"))(scope, receive, send)
            return
        given = headers.get(b"authorization", b"")
        refused = self.api_key and scope["path"] not in OPEN_PATHS and not bearer_matches(given, self.api_key)
        if scope["type"] == "websocket":
            if refused:  # at the handshake: the client sees HTTP 403
                await receive()
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or incorrect API key"})
                return
            await self.app(scope, receive, send)
            return
        if refused:
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
