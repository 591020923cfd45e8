"""The session behind `moi ui`: one :class:`LiveSession` that every open page shares, and
the ticker that streams it to them (see :mod:`local.web` for the wire protocol).

The ticker drains the session's events every ``tick_s`` and sends one ``tick`` to each page
whether or not anything happened: meter levels are aggregated per tick, so a page gets ~20
steady updates a second (also in silence, so its waveforms keep their time scale) however
bursty the pipeline is. Reply audio goes out as binary ``shared.wire`` frames (PCM16).

Three parts by job: :class:`Hub` controls the session (start, Stop, end, from the pages'
commands), :class:`Pages` is what the pages are shown (broadcast, history, meters, the tick),
:class:`Uploads` what they uploaded. One module (~460 lines) because they share the page
protocol's small types (:class:`Client`, :class:`BrowserPlayback`, :class:`FileInput`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import WebSocket, WebSocketDisconnect

from shared.engine import Engine
from cloud.live import LiveSession
from cloud.pipeline import file_source
from local.run import attach_echo, build, paced
from shared.audio import Audio, decode
from shared.config import Config
from shared.errors import AudioError, ConfigError, MoiError
from shared.events import MeterTick, ReplyAudio, ReplyStopped, Status, to_dict
from shared.wire import encode_frame

log = logging.getLogger("moi.web")


@dataclass(frozen=True)
class UiPipeline:
    """A choice in the page's picker: which pipeline variant runs, which panels show."""

    id: str
    label: str
    variant: str  # cloud.pipeline.VARIANTS
    panels: tuple[str, ...]  # of "pre", "post", "reply" ("aec" shows with "pre" when a canceller runs)
    stages: tuple[str, ...]  # drawn as the chain of elements


PIPELINES = {
    p.id: p
    for p in (
        UiPipeline("transcribe", "transcribe only", "transcribe", (), ("input", "Whisper", "text")),
        UiPipeline("meters", "+ meters", "transcribe", ("pre",), ("input", "meter", "Whisper", "text")),
        UiPipeline("vad", "+ VAD", "transcribe", ("pre", "post"),
                   ("input", "meter", "Silero VAD", "meter", "Whisper", "text")),
        UiPipeline("echo", "echo through the voice", "echo", ("pre", "post", "reply"),
                   ("input", "meter", "Silero VAD", "meter", "Whisper", "TTS", "browser")),
        UiPipeline("chat", "full chat", "chat", ("pre", "post", "reply"),
                   ("input", "meter", "Silero VAD", "meter", "Whisper", "SmolLM2", "TTS", "browser")),
    )
}
INPUTS = {"mic": "microphone", "sample": "bundled sample", "upload": "uploaded file"}


class BrowserPlayback:
    """The page's playback as the session sees it (LiveSession's ``player``).

    The browser plays the reply, so this only keeps time: how long what was handed out takes
    to play. That keeps half-duplex honest (moi's voice from the laptop speaker is not taken
    for the user) and lets Stop cut a reply the page is still playing after generation ended.
    """

    LEAD_S = 0.1  # a tick and the network, before the page starts playing a piece
    pausable = False  # the page plays: a barge-in stops the reply there

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0
        self.stopped_at: float | None = None

    def play(self, audio: Audio) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + self.LEAD_S) + audio.seconds

    @property
    def playing(self) -> bool:
        return time.monotonic() < self._until

    def stop(self) -> float:
        with self._lock:
            now = time.monotonic()
            left, self._until = max(0.0, self._until - now), 0.0
            if left:
                self.stopped_at = now
            return left

    def pause(self) -> None:
        raise NotImplementedError("the page's playback cannot pause (pausable is False)")

    def resume(self) -> None:
        raise NotImplementedError("the page's playback cannot pause (pausable is False)")

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.playing:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self.stop()


class FileInput:
    """A file in real time, then silence in real time (a quiet room after the speaker), until
    closed: the session stays live, its waveforms keep scrolling and its last turn plays out.
    ``close`` may come from another thread; the chunks stop within one chunk (0.1 s)."""

    def __init__(self, path: Path) -> None:
        decode(path)  # a file that is not audio fails here, not in the capture thread
        self.path = path
        self._closed = threading.Event()

    def _chunks(self) -> Iterator[Audio]:
        yield from file_source(self.path)
        silence = Audio.silence(0.1)
        while True:
            yield silence

    def __iter__(self) -> Iterator[Audio]:
        for chunk in paced(self._chunks()):
            if self._closed.is_set():
                return
            yield chunk

    def close(self) -> None:
        self._closed.set()


@dataclass(frozen=True)
class Upload:
    id: str
    name: str
    seconds: float
    path: Path


class Client:
    """One connected page: a bounded outbox drained by its own sender task, so a slow page
    never holds up the ticks of the others (one that falls too far behind is dropped and
    reconnects)."""

    def __init__(self, ws: WebSocket, max_queue: int = 400) -> None:
        self.ws = ws
        self.outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue(max_queue)

    def send(self, message: dict | bytes) -> bool:
        try:
            self.outbox.put_nowait(message if isinstance(message, bytes) else json.dumps(message))
            return True
        except asyncio.QueueFull:
            return False

    async def pump(self) -> None:
        try:
            while (msg := await self.outbox.get()) is not None:
                if isinstance(msg, bytes):
                    await self.ws.send_bytes(msg)
                else:
                    await self.ws.send_text(msg)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the page went away mid-send; its receive loop ends and detaches it

    async def drop(self, reason: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.ws.close(code=1013, reason=reason)


class Uploads:
    """Files pages uploaded, on disk for a session to play: the newest ``limit`` of them."""

    def __init__(self, folder: Path, limit: int = 8, max_seconds: float = 1800.0) -> None:
        self.folder, self.limit, self.max_seconds = folder, limit, max_seconds
        self.items: dict[str, Upload] = {}

    async def add(self, name: str, data: bytes) -> Upload:
        # AudioError: not audio; AudioTooLong: over the limit, found before decoding it all
        audio = await asyncio.to_thread(decode, data, name=name, max_seconds=self.max_seconds)
        uid = uuid.uuid4().hex[:12]
        path = self.folder / f"{uid}{Path(name).suffix[:10] or '.bin'}"
        await asyncio.to_thread(path.write_bytes, data)
        upload = Upload(uid, name, audio.seconds, path)
        self.items[uid] = upload
        while len(self.items) > self.limit:
            old = self.items.pop(next(iter(self.items)))
            old.path.unlink(missing_ok=True)
        return upload

    def find(self, spec: str) -> Upload | None:
        """The upload an input spec (``upload:<id>``) names, if it is still here."""
        return self.items.get(spec[7:]) if spec.startswith("upload:") else None

    def listing(self) -> list[dict]:
        return [{"id": u.id, "name": u.name, "seconds": round(u.seconds, 2)} for u in self.items.values()]


class Pages:
    """The connected pages and what they are shown: broadcasts, hub notices, and the session's
    history and meter traces (a page that joins late sees what the others see). ``tick`` drains
    a session's events into one ``tick`` message for every page."""

    def __init__(self) -> None:
        self.clients: set[Client] = set()
        self.history: deque[dict] = deque(maxlen=2000)  # this session's events, for pages that join
        self.pre: deque[float] = deque(maxlen=600)
        self.aec: deque[float] = deque(maxlen=600)  # after the echo canceller, when one runs
        self.post: deque[float] = deque(maxlen=600)
        self.status: dict | None = None
        self.stopped_turn = 0  # reply audio of this turn and earlier is not sent
        self._seq = itertools.count()
        self._pending: list[dict] = []  # hub notices for the next tick
        self._tasks: set[asyncio.Task] = set()  # pages being dropped (held so they are not collected)

    def reset(self) -> None:
        """A new session: nothing of the last one is shown."""
        self.history.clear()
        self.pre.clear()
        self.aec.clear()
        self.post.clear()
        self.stopped_turn = 0
        self.status = None

    def attach(self, client: Client, hello: dict) -> None:
        self.clients.add(client)
        client.send({**hello, "history": list(self.history), "pre": list(self.pre), "aec": list(self.aec),
                     "post": list(self.post), "status": self.status, "clients": len(self.clients)})

    def detach(self, client: Client) -> None:
        self.clients.discard(client)
        with contextlib.suppress(asyncio.QueueFull):
            client.outbox.put_nowait(None)  # ends its sender

    def broadcast(self, message: dict | bytes) -> None:
        for client in list(self.clients):
            if not client.send(message):
                log.warning("a page fell behind; dropping it (it will reconnect)")
                self.clients.discard(client)
                task = asyncio.ensure_future(client.drop("this page fell behind; reconnect"))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def notice(self, **fields) -> None:
        """A hub event (session state, errors outside a turn) for the next tick and the history."""
        self._pending.append(fields)
        self.history.append(fields)

    def tick(self, session: LiveSession | None, state: str) -> bool:
        """One ``tick`` to every page with what ``session`` did since the last; True once the
        session has ended (its source ended or failed)."""
        meters: dict[str, list[float]] = {"pre": [], "aec": [], "post": []}
        events, frames = self._pending, []
        self._pending = []
        ended = False
        if session is not None:
            for _ in range(5000):
                try:
                    ev = session.events.get_nowait()
                except queue.Empty:
                    break
                if ev is None:
                    ended = True
                    break
                if isinstance(ev, MeterTick):
                    meters[ev.stage].append(round(ev.rms_db, 1))
                elif isinstance(ev, Status):
                    self.status = to_dict(ev)
                elif isinstance(ev, ReplyAudio):
                    if ev.turn > self.stopped_turn:
                        header = {"type": "reply_audio", "turn": ev.turn, "t": round(ev.t, 3), "text": ev.text,
                                  "sample_rate": ev.audio.sample_rate, "format": "pcm16"}
                        frames.append(encode_frame(header, ev.audio.to_pcm16()))
                        events.append(to_dict(ev))
                else:
                    if isinstance(ev, ReplyStopped):  # Stop or barge-in: the rest of this reply is not sent
                        self.stopped_turn = max(self.stopped_turn, ev.turn)
                    d = to_dict(ev)
                    events.append(d)
                    self.history.append(d)
        self.pre.extend(meters["pre"])
        self.aec.extend(meters["aec"])
        self.post.extend(meters["post"])
        self.broadcast({
            "type": "tick", "seq": next(self._seq), "state": state, **meters,
            "events": events, "status": self.status, "clients": len(self.clients),
        })
        for frame in frames:
            self.broadcast(frame)
        return ended


class Hub:
    """The one live session all pages share: starting, stopping and ending it, from the pages'
    commands; what the pages are shown is :class:`Pages`, what they uploaded :class:`Uploads`."""

    def __init__(
        self, cfg: Config, engine: Engine, sample: Path, *, tick_s: float = 0.05, barge_in: str = "auto",
        input_device: str | None = None, upload_dir: Path, max_uploads: int = 8, max_upload_s: float = 1800.0,
        speaker: bool = False, output_device: str | None = None,
    ) -> None:
        self.cfg, self.engine, self.sample = cfg, engine, sample
        self.tick_s, self.barge_in, self.input_device = tick_s, barge_in, input_device
        self.speaker, self.output_device = speaker, output_device  # replies on this machine's speaker
        self.pages = Pages()
        self.uploads = Uploads(upload_dir, max_uploads, max_upload_s)
        self.session: LiveSession | None = None
        self.state = "idle"  # idle | loading | running
        self.choice = {"pipeline": "chat", "input": "sample"}
        self._lock = asyncio.Lock()  # one start/end at a time
        self._tasks: set[asyncio.Task] = set()  # starts and ends in flight (held so they are not collected)

    def attach(self, client: Client) -> None:
        self.pages.attach(client, {
            "type": "hello", "pipelines": [asdict(p) for p in PIPELINES.values()],
            "inputs": [{"id": k, "label": v} for k, v in INPUTS.items()], "uploads": self.uploads.listing(),
            "state": self.state, "choice": self.choice, "playback": "speaker" if self.speaker else "page",
            "tick_ms": round(self.tick_s * 1000),
        })

    # --- commands -------------------------------------------------------------------------

    async def command(self, msg: dict, client: Client) -> None:
        cmd = msg.get("cmd")
        if cmd == "start":
            self._spawn(self.start(str(msg.get("pipeline", "")), str(msg.get("input", ""))))
        elif cmd == "stop":
            self.stop_reply()
        elif cmd == "end":
            self._spawn(self.end())
        else:
            client.send({"type": "error", "message": f"unknown command {cmd!r}: use start, stop or end"})

    def _spawn(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, pipeline_id: str, input_spec: str) -> None:
        notice = self.pages.notice
        async with self._lock:
            await self._end_session("restarted")
            try:
                choice = PIPELINES.get(pipeline_id)
                if choice is None:
                    raise ConfigError(f"unknown pipeline {pipeline_id!r}: choose one of {', '.join(PIPELINES)}")
                self.choice = {"pipeline": pipeline_id, "input": input_spec}
                self.pages.reset()
                self.state = "loading"
                notice(type="session", state="loading", pipeline=pipeline_id, input=input_spec,
                       input_label=self._input_label(input_spec))
                pipeline = await asyncio.to_thread(build, self.cfg, choice.variant, None, self.engine)
                source = await asyncio.to_thread(self._source, input_spec)
                playback = await asyncio.to_thread(self._playback)
                echo, note = attach_echo(source, playback, self.cfg, self.barge_in)
                if note:
                    notice(type="note", message=note)
                self.session = LiveSession(
                    pipeline, source, playback, barge_in=self.barge_in, hears_player=input_spec == "mic", echo=echo,
                ).start()
                self.state = "running"
                notice(type="session", state="running", pipeline=pipeline_id, input=input_spec,
                       input_label=self._input_label(input_spec))
            except Exception as exc:  # the page must hear why, whatever it was
                if not isinstance(exc, MoiError):
                    log.exception("starting %s on %s failed", pipeline_id, input_spec)
                message = str(exc) if isinstance(exc, MoiError) else f"{type(exc).__name__}: {exc} (see the server log)"
                self.state = "idle"
                notice(type="error", message=f"could not start: {message}", turn=None)
                notice(type="session", state="idle", reason="could not start")

    async def end(self) -> None:
        async with self._lock:
            await self._end_session("ended")

    def stop_reply(self) -> None:
        """Stop: every page silences its playback now; generation ends at its next step."""
        session = self.session
        turn = session.turns if session is not None else 0
        self.pages.stopped_turn = max(self.pages.stopped_turn, turn)
        self.pages.broadcast({"type": "stop_playback", "turn": turn})
        if session is not None:
            session.stop_reply("stop")

    async def _end_session(self, reason: str) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        await asyncio.to_thread(session.close)
        close_player = getattr(session.player, "close", None)
        if close_player is not None:
            await asyncio.to_thread(close_player)
        self.state = "idle"
        self.pages.broadcast({"type": "stop_playback", "turn": session.turns})
        self.pages.notice(type="session", state="idle", reason=reason)

    def _playback(self):  # noqa: ANN202 - the session's player
        if not self.speaker:
            return BrowserPlayback()
        from local.audio_io import Player

        return Player(self.output_device)

    def _source(self, spec: str):  # an iterable of Audio with close()
        if spec == "mic":
            from local.audio_io import MicSource

            return MicSource(self.input_device).start()
        if spec == "sample":
            return FileInput(self.sample)
        if (upload := self.uploads.find(spec)) is not None:
            return FileInput(upload.path)
        if spec.startswith("upload"):
            raise AudioError("no such upload (it expired or the server restarted): upload the file again")
        raise ConfigError(f"unknown input {spec!r}: mic, sample or upload:<id>")

    def _input_label(self, spec: str) -> str:
        upload = self.uploads.find(spec)
        return upload.name if upload is not None else INPUTS.get(spec, spec)

    # --- the ticker ------------------------------------------------------------------------

    async def run_ticker(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.tick_s
            delay = next_at - time.monotonic()
            if delay < -self.tick_s:  # fell behind (a loaded machine): keep the cadence, skip the backlog
                next_at = time.monotonic()
            await asyncio.sleep(max(0.0, delay))
            try:
                await self.tick()
            except Exception:  # a ticker that dies freezes every page: log it and keep ticking
                log.exception("tick failed")

    async def tick(self) -> None:
        session = self.session
        if self.pages.tick(session, self.state) and session is self.session:  # its source ended or failed
            self._spawn(self._ended(session))

    async def _ended(self, session: LiveSession) -> None:
        async with self._lock:
            if session is self.session:
                await self._end_session("input ended")

    async def close(self) -> None:
        async with self._lock:
            await self._end_session("server stopped")
