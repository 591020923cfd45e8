"""The deployed Modal app (``modal deploy modal_app.py``), found by name through the Modal SDK.

The laptop never imports ``modal_app.py`` (it is not part of the installed package): it looks
the deployed functions up by name, so ``--url modal`` and ``moi transcribe --remote`` work from
any install that has the Modal client and a token, and say in one line what is missing when not.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from shared.config import MODAL_APP
from shared.errors import EngineError, MoiError

NO_TOKEN = (
    "needs a Modal token: run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET), "
    "deploy once with `modal deploy modal_app.py`, then run this again"
)


def modal_client(what: str) -> ModuleType:
    """The ``modal`` package, once it is installed and has a token; else one clear MoiError."""
    try:
        import modal
        from modal.config import config
    except ImportError:
        raise MoiError(f"{what} needs the Modal client: pip install 'moi[modal]'") from None
    if not (config.get("token_id") or os.environ.get("MODAL_TOKEN_ID")):
        raise MoiError(f"{what} {NO_TOKEN}")
    return modal


def gateway_url(what: str = "--url modal") -> str:
    """The URL of the deployed gateway (``modal_app.web``): a turn is then one HTTP request."""
    modal = modal_client(what)
    try:
        url = modal.Function.from_name(MODAL_APP, "web").get_web_url()
    except modal.exception.Error as exc:
        raise EngineError(f"{what}: the deployed app {MODAL_APP!r} was not found ({_first_line(exc)}); "
                          "deploy it with `modal deploy modal_app.py`") from None
    if not url:
        raise EngineError(f"{what}: the deployed app {MODAL_APP!r} has no web gateway; redeploy modal_app.py")
    return url


def transcriber(what: str = "--remote") -> tuple[Any, tuple[type[BaseException], ...]]:
    """The deployed ``Transcriber`` (lazy: no network until its first call) and the errors Modal raises."""
    modal = modal_client(what)
    return modal.Cls.from_name(MODAL_APP, "Transcriber")(), (ConnectionError, modal.exception.Error)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
