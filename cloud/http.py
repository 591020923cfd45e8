"""The HTTP gateway: OpenAI-compatible endpoints, the Realtime WebSocket and ``/v1/turn``, over
any engine.

Stateless over HTTP (the client owns the conversation) and Modal-free: ``create_app(LocalEngine(cfg))``
serves the in-process models (``moi serve``); Modal serves the same app over its GPU class
(``modal_app.ModalEngine``). ``/v1/turn`` streams ``engine.turn``: one request per utterance.
The routes live in :mod:`cloud.routes`, one router per area; this module only assembles them
behind the :class:`cloud.gate.Gate` (host, key, body size, errors in OpenAI's shape).

The engine is blocking, so every call runs in a worker thread (:mod:`cloud.streams`). A
stream's first item is awaited before the response starts, so failures up to then get a real
status code; later ones are reported in-stream. A client that goes away mid-stream sets the
request's cancel event, which stops generation between tokens and synthesis between sentences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from cloud.gate import Gate, any_error_handler
from cloud.routes import ROUTERS, Gateway, Limits
from shared.config import Config
from shared.errors import MoiError

if TYPE_CHECKING:
    from cloud.vad import Segmenter
    from shared.engine import Engine


def create_app(engine: Engine, *, api_key: str | None = None, limits: Limits = Limits(), cfg: Config | None = None,
               listening: Callable[[], Segmenter] | None = None) -> FastAPI:
    """The gateway over ``engine``; with ``api_key`` set, every route but /health needs it.
    ``cfg``: the Realtime sessions' VAD and reply settings; ``listening`` builds a connection's
    VAD and Smart Turn (default: :func:`cloud.pipeline.listening` from ``cfg``)."""
    app = FastAPI(title="moi gateway", version="0.1.0")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.gateway = Gateway(engine, limits, cfg or Config(), listening)
    app.add_middleware(Gate, api_key=api_key, max_body=limits.max_upload_bytes)
    for exc_class in (HTTPException, MoiError, RequestValidationError):
        app.add_exception_handler(exc_class, any_error_handler)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less its stock 422 (bad parameters are a 400 here, as at OpenAI)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


__all__ = ["Limits", "create_app"]
