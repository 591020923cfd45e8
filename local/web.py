"""`moi ui`: the web live view. A small FastAPI server runs one live session that every open
page shares (:class:`local.web_hub.Hub`) and streams its events to the pages over a WebSocket.

What travels (``/ws``):
- server → page, text: ``hello`` once per connection (pipelines, inputs, the session so far),
  then a ``tick`` every ``tick_s`` (default 50 ms) whether or not anything happened: the meter
  levels (dBFS RMS) since the last tick for ``pre`` / ``post`` VAD, the events since then
  (``shared.events.to_dict``), the latest status. Steady ticks in silence keep the page's
  waveforms on a true time scale; throttling keeps a burst of tokens from flooding it.
  ``stop_playback`` goes out at once when someone presses Stop.
- server → page, binary: reply audio, one ``shared.wire`` frame per TTS piece (a JSON header
  with turn and sample rate, then PCM16). The page plays it with Web Audio, so Stop silences
  the browser as well as ending generation; the machine's speaker is not used.
- page → server, text: ``{"cmd": "start", "pipeline": ..., "input": "mic" | "sample" |
  "upload:<id>"}``, ``{"cmd": "stop"}`` (cut the reply), ``{"cmd": "end"}`` (end the session).

Uploads go to ``POST /api/upload`` and are checked with :func:`shared.audio.decode`; a file
that is not audio gets a 400 with ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, UploadFile, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from cloud.engine import LocalEngine
from cloud.gate import Gate, any_error_handler
from shared.engine import Engine
from cloud.live import BARGE_IN_MODES
from local import SAMPLE
from local.run import build
from local.web_hub import PIPELINES, Client, Hub
from shared.config import Config
from shared.errors import AudioError, ConfigError

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}}, status)


def allowed_hosts(host: str) -> frozenset[str] | None:
    """The Host names the page may be reached by: loopback and the --host given. None (any) when
    serving on every interface, which the user chose knowingly (and is warned about)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return frozenset({*LOOPBACK, host})


def create_ui_app(
    cfg: Config, engine: Engine | None = None, *, sample: Path | None = None, tick_s: float = 0.05,
    barge_in: str = "auto", input_device: str | None = None, max_upload_mb: int = 50, host: str = "127.0.0.1",
    speaker: bool = False, output_device: str | None = None,
) -> FastAPI:
    """The web live view over ``engine`` (default: a LocalEngine on ``cfg``). Models load when a
    page starts a pipeline (or before, see :func:`run_ui`)."""
    if barge_in not in BARGE_IN_MODES:
        raise ConfigError(f"unknown barge-in mode {barge_in!r}: use auto, half (speakers) or full (headset)")
    if sample is None:
        sample = SAMPLE
    engine = engine or LocalEngine(cfg)
    uploads = tempfile.TemporaryDirectory(prefix="moi-ui-")
    hub = Hub(cfg, engine, sample, tick_s=tick_s, barge_in=barge_in, input_device=input_device,
              upload_dir=Path(uploads.name), speaker=speaker, output_device=output_device)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ticker = asyncio.ensure_future(hub.run_ticker())
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await hub.close()
            uploads.cleanup()

    app = FastAPI(title="moi ui", lifespan=lifespan)
    # Host and Origin on every route (DNS rebinding), and uploads cut at the limit as they arrive.
    app.add_middleware(Gate, api_key=None, max_body=max_upload_mb * 1024 * 1024 + 64 * 1024, hosts=allowed_hosts(host))
    app.add_exception_handler(HTTPException, any_error_handler)  # 413 and friends in the page's error shape
    app.state.hub = hub
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    async def state() -> dict:
        return {"state": hub.state, "choice": hub.choice, "clients": len(hub.pages.clients), "pipelines": list(PIPELINES)}

    @app.post("/api/upload")
    async def upload(file: UploadFile | None = None) -> JSONResponse:
        if file is None:
            return _error(400, "send the audio file as multipart/form-data field 'file'", "missing_file")
        data = await file.read()  # the Gate has cut anything over max_upload_mb already
        try:
            up = await hub.uploads.add(file.filename or "upload", data)
        except AudioError as exc:
            return _error(400, str(exc), "invalid_audio")
        return JSONResponse({"id": up.id, "name": up.name, "seconds": round(up.seconds, 2)})

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()  # the Gate has checked its Host and Origin
        client = Client(ws)
        hub.attach(client)
        sender = asyncio.ensure_future(client.pump())
        try:
            while (message := await ws.receive())["type"] != "websocket.disconnect":
                msg = _command(message.get("text"))
                if isinstance(msg, str):
                    client.send({"type": "error", "message": msg})
                else:
                    await hub.command(msg, client)
        finally:  # the page went away (closed, reloaded, dropped): it reconnects if it can
            hub.pages.detach(client)
            sender.cancel()

    return app


def _command(text: str | None) -> dict | str:
    """A page's command as a dict, or why it is not one."""
    try:
        msg = json.loads(text) if text is not None else None
    except ValueError as exc:
        return f"bad command (not JSON: {exc}); send {{\"cmd\": \"start\" | \"stop\" | \"end\", ...}}"
    if not isinstance(msg, dict):
        return 'bad command: send a JSON object as text, e.g. {"cmd": "stop"}'
    return msg


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_ui(
    cfg: Config, engine: Engine | None = None, *, host: str = "127.0.0.1", port: int = 8080,
    preload: bool = True, barge_in: str = "auto", input_device: str | None = None, console=None,
    speaker: bool = False, output_device: str | None = None,
) -> None:
    """Serve the web live view until Ctrl-C. ``preload``: load every model first, so the
    first Start answers at once."""
    import uvicorn
    from rich.console import Console

    console = console or Console(stderr=True, highlight=False)
    try:
        import websockets  # noqa: F401 - uvicorn's WebSocket protocol
    except ImportError as exc:
        raise ConfigError("moi ui needs the websockets package: pip install websockets") from exc
    if not port_free(host, port):
        raise ConfigError(f"port {port} on {host} is in use: pick another with --port")
    engine = engine or LocalEngine(cfg)
    app = create_ui_app(cfg, engine, barge_in=barge_in, input_device=input_device, host=host, speaker=speaker,
                        output_device=output_device)
    if preload:
        build(cfg, "chat", console, engine)
    if host not in LOOPBACK:
        console.print("[yellow]warning:[/] serving beyond loopback: anyone who can reach it can start your microphone")
    shown = f"[{host}]" if ":" in host else host
    console.print(f"moi ui on [bold]http://{shown}:{port}/[/] (Ctrl-C to quit)")
    uvicorn.run(app, host=host, port=port, log_level="warning", ws="auto")
