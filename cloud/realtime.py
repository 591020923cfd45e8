"""OpenAI's Realtime API on the gateway: ``/v1/realtime``, one WebSocket per conversation.

A connection is a :class:`~cloud.live.LiveSession`, the same conversation state machine and
turn the laptop's live client runs, fed from the socket instead of a microphone: audio appended
by the client goes through the VAD and Smart Turn (server VAD) or waits for the client's commit
(turn detection off); the machine's events are translated into the Realtime API's server events
as they happen, on the machine's own thread, so items, responses and their order follow it.

What maps to what:

- ``input_audio_buffer.append`` (PCM16 24 kHz, base64) → resampled to 16 kHz → the VAD, or the
  buffer a ``commit`` turns into an utterance (:class:`~cloud.conversation.Said`);
- a turn the machine decides → ``input_audio_buffer.committed``, the user item, a response;
  its ``Transcript`` → ``conversation.item.input_audio_transcription.completed``; tokens →
  ``response.output_audio_transcript.delta`` (``output_text`` for text-only sessions); Kokoro's
  pieces → ``response.output_audio.delta``; ``TurnDone`` → ``response.done`` with the turn's
  timings in ``metadata``;
- ``response.cancel`` → Stop (``response.done``, ``cancelled``); speech over a reply → the
  machine's barge-in (``full``: the client plays the audio, so nothing here hears moi's voice);
  a reply withdrawn because the person went on → ``cancelled`` and its item deleted;
- ``conversation.item.create`` (text) / ``.delete`` → the connection's thread.

The server keeps a virtual playhead (:class:`Playhead`): a reply counts as playing for as long
as its audio lasts from when it was sent, as the client would play it.

Why one long module (~550 lines): a connection's two halves, what the client sends and what
the machine's events become, share its ids and items; split, each would reach into the other.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import soxr
from starlette.websockets import WebSocket, WebSocketDisconnect

from cloud.conversation import Utterance
from cloud.live import LiveSession
from cloud.pipeline import Pipeline
from cloud.vad import Segmenter
from cloud.wire import pick_voice
from shared.audio import REPLY_RATE, SPEECH_RATE, Audio
from shared.config import Config
from shared.engine import Engine, TurnRequest
from shared.events import (
    ErrorEvent,
    Event,
    ReplyAudio,
    ReplyStopped,
    ReplyText,
    ReplyToken,
    ReplyWithdrawn,
    SpeechEnded,
    SpeechStarted,
    Transcript,
    TurnDone,
    TurnStarted,
)
from shared.messages import Message, Thread

log = logging.getLogger("moi.realtime")
RATE = REPLY_RATE  # the Realtime API's audio/pcm: PCM16 mono 24 kHz, both ways
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less than 100 ms of audio


class Playhead:
    """The :class:`~cloud.conversation.Player` of a socket: the client plays what was sent; a
    reply plays for as long as its audio lasts from when it went out. ``audible()``: whether the
    client gets the audio at all (a text session reads every piece as it comes: nothing of it
    is unheard when it stops)."""

    pausable = False

    def __init__(self, audible: Callable[[], bool] = lambda: True) -> None:
        self._until = 0.0
        self._audible = audible

    @property
    def playing(self) -> bool:
        return time.monotonic() < self._until

    def play(self, audio: Audio) -> None:
        self._until = max(time.monotonic(), self._until) + audio.seconds

    def pause(self) -> None:  # not pausable: a barge-in stops the reply
        pass

    def resume(self) -> None:
        pass

    def stop(self) -> float:
        left, self._until = max(0.0, self._until - time.monotonic()), 0.0
        return left if self._audible() else 0.0


class SocketSource:
    """The microphone of a socket: 16 kHz chunks as the client appends them, until closed."""

    def __init__(self) -> None:
        self._chunks: queue.Queue[Audio | None] = queue.Queue()

    def put(self, chunk: Audio) -> None:
        self._chunks.put(chunk)

    def close(self) -> None:
        self._chunks.put(None)

    def __iter__(self) -> Iterator[Audio]:
        while (chunk := self._chunks.get()) is not None:
            yield chunk


class ClientError(Exception):
    """A client event that cannot be done: an ``error`` event, and the connection goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


class RealtimeStages(Pipeline):
    """The pipeline of one connection: its thread is the connection's items (guarded, since the
    socket's side adds and deletes them), its voice and token limit are the session's."""

    def __init__(self, engine: Engine, segmenter: Segmenter, cfg: Config) -> None:
        super().__init__(engine, segmenter, cfg, "chat", Thread(cfg.llm.system_prompt, cfg.llm.max_turns))
        self.lock = threading.Lock()
        self.voice: str | None = None
        self.max_tokens = cfg.llm.max_tokens

    def request(self, n: int) -> TurnRequest:
        with self.lock:
            req = super().request(n)
        return replace(req, voice=self.voice, options=replace(req.options, max_tokens=self.max_tokens))

    def remember(self, heard: str | None, reply: str, revising: Message | None = None) -> Message | None:
        with self.lock:
            return super().remember(heard, reply, revising)


@dataclass
class _Response:
    id: str
    turn: int
    item: str  # the assistant item
    user: str | None  # the user item it answers (None: a typed message's)
    seconds: float = 0.0  # the user's audio it answers
    cancelled: bool = False
    text: list[str] = field(default_factory=list)
    tokens: int = 0


class Realtime:
    """One connection: the session settings, the LiveSession, and the translation of its events
    (``send`` takes a server event as a dict, from any thread)."""

    def __init__(self, engine: Engine, segmenter: Segmenter, cfg: Config, send: Callable[[dict], None],
                 voices: list[str], model: str = "moi") -> None:
        self.engine, self.cfg, self._send, self.voices = engine, cfg, send, voices
        self._ids = itertools.count(1)
        self.stages = RealtimeStages(engine, segmenter, cfg)
        self.session: dict[str, Any] = {
            "type": "realtime", "object": "realtime.session", "id": self._id("sess"), "model": model,
            "output_modalities": ["audio"], "instructions": cfg.llm.system_prompt,
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": RATE}, "transcription": None,
                          "noise_reduction": None, "turn_detection": _server_vad()},
                "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": cfg.tts.voice, "speed": 1.0},
            },
            "max_output_tokens": cfg.llm.max_tokens, "tools": [], "tool_choice": "auto",
        }
        self.source = SocketSource()
        self.live = LiveSession(self.stages, self.source, Playhead(lambda: self._audio_out), barge_in="full",
                                hears_player=False, meters=False, on_event=self._event)
        self._resample = soxr.ResampleStream(RATE, SPEECH_RATE, 1, dtype="float32")
        self._buffer: list[Audio] = []  # turn detection off: appended, not committed yet
        self._stream_s = 0.0  # input received so far (s at 16 kHz): where a commit lies
        self._committed: dict[float, str] = {}  # a commit's start in the input → its user item
        self._speech_item: str | None = None  # the user item the speech under way will go into
        self._last_item: str | None = None
        self._response: _Response | None = None  # the one in progress (machine thread)
        self._active = False  # a response is in progress (read by the socket's side for cancel)

    # --- the socket's side ---------------------------------------------------------------------

    def start(self) -> None:
        self.live.start()
        self.send("session.created", session=self.session)

    def close(self) -> None:
        self.live.close()

    def handle(self, raw: str | bytes) -> None:
        """One client event; a bad one is answered with an ``error`` event."""
        event_id = None
        try:
            try:
                event = json.loads(raw)
            except ValueError:
                raise ClientError("the message is not JSON: send Realtime client events as JSON text") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ClientError("an event is a JSON object with a `type`", param="type")
            event_id = event.get("event_id")
            handler = self._handlers.get(event["type"])
            if handler is None:
                raise ClientError(f"unknown or unsupported event type {event['type']!r}", "unknown_event", "type")
            handler(self, event)
        except ClientError as exc:
            self.send("error", error={"type": "invalid_request_error", "code": exc.code, "message": str(exc),
                                      "param": exc.param, "event_id": event_id})

    def _session_update(self, event: dict) -> None:
        s = event.get("session")
        if not isinstance(s, dict):
            raise ClientError("session.update needs a `session` object", param="session")
        if s.get("type", "realtime") != "realtime":
            raise ClientError("only realtime sessions are served (not transcription-only ones)", param="session.type")
        if s.get("tools"):
            raise ClientError("tools are not supported", "unsupported", "session.tools")
        audio = s.get("audio") or {}
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        for where, fmt in (("input", inp.get("format")), ("output", out.get("format"))):
            if fmt is not None and (fmt.get("type") != "audio/pcm" or fmt.get("rate", RATE) != RATE):
                raise ClientError(f"audio {where} format: only audio/pcm at {RATE} Hz", "unsupported",
                                  f"session.audio.{where}.format")
        modalities = s.get("output_modalities")
        if modalities is not None and modalities not in (["audio"], ["text"]):
            raise ClientError('output_modalities is ["audio"] or ["text"]', param="session.output_modalities")
        voice = out.get("voice")
        if voice is not None:
            chosen = pick_voice(voice, self.voices)
            if chosen is None:
                raise ClientError(f"unknown voice {voice!r}", "invalid_voice", "session.audio.output.voice")
        limit = s.get("max_output_tokens")
        if limit is not None and limit != "inf" and not (isinstance(limit, int) and limit > 0):
            raise ClientError("max_output_tokens is a positive integer or \"inf\"", param="session.max_output_tokens")
        # all checked: apply
        stages, mine = self.stages, self.session
        if "instructions" in s:
            with stages.lock:
                stages.thread.system_prompt = mine["instructions"] = str(s["instructions"] or "")
        if modalities is not None:
            mine["output_modalities"] = modalities
        if voice is not None:
            stages.voice = chosen
            mine["audio"]["output"]["voice"] = voice
        if limit is not None:
            stages.max_tokens = self.cfg.llm.context // 2 if limit == "inf" else min(limit, self.cfg.llm.context // 2)
            mine["max_output_tokens"] = limit
        if "transcription" in inp:
            mine["audio"]["input"]["transcription"] = inp["transcription"]
        if "turn_detection" in inp:
            td = inp["turn_detection"]
            if td is not None and (not isinstance(td, dict) or td.get("type") not in ("server_vad", "semantic_vad")):
                raise ClientError("turn_detection is null, server_vad or semantic_vad", param="session.audio.input.turn_detection")
            mine["audio"]["input"]["turn_detection"] = None if td is None else {**_server_vad(td["type"]), **td}
            machine = self.live.machine  # plain flags it reads as it steps
            machine.auto_answer = td is not None and td.get("create_response", True)
            machine.barge_in = "full" if td is None or td.get("interrupt_response", True) else "half"
        self.send("session.updated", session=mine)

    @property
    def _vad_on(self) -> bool:
        return self.session["audio"]["input"]["turn_detection"] is not None

    def _append(self, event: dict) -> None:
        try:
            data = base64.b64decode(event.get("audio") or "", validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("`audio` is not valid base64", "invalid_base64", "audio") from None
        if len(data) % 2:
            raise ClientError("`audio` must be whole PCM16 samples (an even number of bytes)", param="audio")
        pcm = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        chunk = Audio(self._resample.resample_chunk(pcm), SPEECH_RATE)
        if not self._vad_on:
            held = sum(a.seconds for a in self._buffer)
            if held + chunk.seconds > self.cfg.vad.max_utterance_s:
                raise ClientError(f"the input buffer would hold over {self.cfg.vad.max_utterance_s:g} s: commit or "
                                  "clear it first", "audio_too_long", "audio")
            self._buffer.append(chunk)
        else:
            self.source.put(chunk)
        self._stream_s += chunk.seconds

    def _commit(self, event: dict) -> None:
        if self._vad_on:
            raise ClientError("with server VAD on, the server commits turns: turn detection off "
                              "(session.audio.input.turn_detection null) lets the client commit", "not_allowed")
        audio = Audio.concat(self._buffer, SPEECH_RATE) if self._buffer else Audio.silence(0.0)
        if audio.seconds < MIN_COMMIT_S:
            raise ClientError(f"the buffer holds {audio.seconds * 1000:.0f} ms of audio: commit at least 100 ms",
                              "input_audio_buffer_commit_empty")
        self._buffer = []
        start = self._stream_s - audio.seconds
        item = self._id("item")
        self._committed[start] = item
        self.send("input_audio_buffer.committed", item_id=item, previous_item_id=self._last_item)
        self._item_added(item, _user_audio(item))
        self.live.said(Utterance(audio, ((start, self._stream_s),)))

    def _clear(self, event: dict) -> None:
        self._buffer = []
        self.send("input_audio_buffer.cleared")

    def _respond(self, event: dict) -> None:
        self.live.respond()

    def _cancel(self, event: dict) -> None:
        if not self._active:
            raise ClientError("no response is in progress", "response_cancel_not_active")
        self.live.stop_reply("cancel")

    def _item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise ClientError("only message items are supported (no function calls)", "unsupported", "item.type")
        role = item.get("role")
        if role not in ("user", "assistant"):
            raise ClientError("a message's role is user or assistant (instructions go in session.update)",
                              param="item.role")
        parts = item.get("content") or []
        if not isinstance(parts, list) or any(not isinstance(p, dict) or p.get("type") not in
                                              ("input_text", "text", "output_text") for p in parts):
            raise ClientError("only text content is supported in items (audio comes through the input buffer)",
                              "unsupported", "item.content")
        text = " ".join(str(p.get("text") or "") for p in parts).strip()
        if not text:
            raise ClientError("the message has no text", param="item.content")
        item_id = item.get("id") or self._id("item")
        stages = self.stages
        with stages.lock:
            if role == "user":
                stages.thread.add_user(text, item_id)
            elif stages.thread.waiting is None:
                raise ClientError("an assistant message needs a user message before it", param="item.role")
            else:
                stages.thread.add_assistant(text, item_id)
        kind = "input_text" if role == "user" else "output_text"
        self._item_added(item_id, {"id": item_id, "object": "realtime.item", "type": "message", "role": role,
                                   "status": "completed", "content": [{"type": kind, "text": text}]}, done=True)

    def _item_delete(self, event: dict) -> None:
        item_id = event.get("item_id")
        with self.stages.lock:
            found = isinstance(item_id, str) and self.stages.thread.delete(item_id)
        if not found:
            raise ClientError(f"no item {item_id!r} in this conversation", "item_not_found", "item_id")
        self.send("conversation.item.deleted", item_id=item_id)

    _handlers: dict[str, Callable[[Realtime, dict], None]] = {
        "session.update": _session_update,
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _commit,
        "input_audio_buffer.clear": _clear,
        "response.create": _respond,
        "response.cancel": _cancel,
        "conversation.item.create": _item_create,
        "conversation.item.delete": _item_delete,
    }

    # --- the machine's side: its events as server events, on its thread ----------------------

    def _event(self, ev: Event | None) -> None:
        r = self._response
        if isinstance(ev, SpeechStarted):
            self._speech_item = self._speech_item or self._id("item")
            self.send("input_audio_buffer.speech_started", audio_start_ms=round(ev.audio_t * 1000),
                      item_id=self._speech_item)
        elif isinstance(ev, SpeechEnded):
            self.send("input_audio_buffer.speech_stopped", audio_end_ms=round(ev.audio_t * 1000),
                      item_id=self._speech_item or self._id("item"))
        elif isinstance(ev, TurnStarted):
            self._turn(ev)
        elif r is None or getattr(ev, "turn", r.turn) != r.turn:
            if isinstance(ev, ErrorEvent) and ev.turn is None:
                self.send("error", error={"type": "server_error", "code": None, "message": ev.message,
                                          "param": None, "event_id": None})
        elif isinstance(ev, Transcript):
            if r.user is not None:
                self.send("conversation.item.input_audio_transcription.completed", item_id=r.user, content_index=0,
                          transcript=ev.text, usage={"type": "duration", "seconds": r.seconds})
                self.send("conversation.item.done", item=_user_audio(r.user, ev.text))
        elif isinstance(ev, ReplyToken):
            r.tokens += 1
            r.text.append(ev.text)
            kind = "response.output_audio_transcript.delta" if self._audio_out else "response.output_text.delta"
            self.send(kind, **self._where(r), delta=ev.text)
        elif isinstance(ev, ReplyAudio):
            if self._audio_out and not r.cancelled:
                pcm = ev.audio.resample(RATE).to_pcm16()
                self.send("response.output_audio.delta", **self._where(r), delta=base64.b64encode(pcm).decode())
        elif isinstance(ev, ReplyText):
            self._reply_done(r, ev.text, ev.cancelled)
        elif isinstance(ev, ReplyStopped):
            r.cancelled = True
        elif isinstance(ev, ReplyWithdrawn):
            self._done(r, "cancelled", {"type": "cancelled", "reason": "turn_detected"})
            self.send("conversation.item.deleted", item_id=r.item)
        elif isinstance(ev, TurnDone):
            self._done(r, "cancelled" if r.cancelled else "completed", None,
                       {"engine": ev.engine, **{k: f"{v:.3f}" for k, v in ev.timings.items()}})
        elif isinstance(ev, ErrorEvent):
            self._done(r, "failed", {"type": "failed", "error": {"type": "server_error", "message": ev.message}})

    @property
    def _audio_out(self) -> bool:
        return self.session["output_modalities"] == ["audio"]

    def _turn(self, ev: TurnStarted) -> None:
        user = None
        if ev.spans:  # said, not typed: the user item (a commit's, or the VAD's new one)
            user = next((self._committed[s] for s, _ in ev.spans if s in self._committed), None)
            if user is None:
                user = self._speech_item or self._id("item")
                self.send("input_audio_buffer.committed", item_id=user, previous_item_id=self._last_item)
                self._item_added(user, _user_audio(user))
            for s, _ in ev.spans:
                self._committed[s] = user  # a withdrawn turn's speech keeps its item when answered again
        self._speech_item = None
        r = self._response = _Response(self._id("resp"), ev.turn, self._id("item"), user,
                                       round(sum(e - s for s, e in ev.spans), 3))
        self.stages.ids = (user or "", r.item)
        self._active = True
        self.send("response.created", response=self._resp(r, "in_progress"))
        item = {"id": r.item, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        self.send("response.output_item.added", response_id=r.id, output_index=0, item=item)
        self._item_added(r.item, item)
        self.send("response.content_part.added", **self._where(r), part=self._part(""))

    def _reply_done(self, r: _Response, text: str, cancelled: bool) -> None:
        where = self._where(r)
        if self._audio_out:
            self.send("response.output_audio.done", **where)
            self.send("response.output_audio_transcript.done", **where, transcript=text)
        else:
            self.send("response.output_text.done", **where, text=text)
        self.send("response.content_part.done", **where, part=self._part(text))
        item = self._assistant(r, text, "incomplete" if cancelled else "completed")
        self.send("response.output_item.done", response_id=r.id, output_index=0, item=item)
        self.send("conversation.item.done", item=item)

    def _done(self, r: _Response, status: str, details: dict | None, metadata: dict | None = None) -> None:
        self._response, self._active = None, False
        self.send("response.done", response={**self._resp(r, status), "status_details": details,
                                             "metadata": metadata,
                                             "output": [self._assistant(r, "".join(r.text).strip(), "completed")]})

    # --- shapes ---------------------------------------------------------------------------------

    def _resp(self, r: _Response, status: str) -> dict:
        return {"id": r.id, "object": "realtime.response", "status": status, "status_details": None, "output": [],
                "conversation_id": None, "output_modalities": self.session["output_modalities"],
                "audio": {"output": self.session["audio"]["output"]},
                "usage": {"total_tokens": r.tokens, "input_tokens": 0, "output_tokens": r.tokens}}

    def _where(self, r: _Response) -> dict:
        return {"response_id": r.id, "item_id": r.item, "output_index": 0, "content_index": 0}

    def _part(self, text: str) -> dict:
        return {"type": "audio", "transcript": text} if self._audio_out else {"type": "text", "text": text}

    def _assistant(self, r: _Response, text: str, status: str) -> dict:
        kind = {"type": "output_audio", "transcript": text} if self._audio_out else {"type": "output_text", "text": text}
        return {"id": r.item, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": [kind]}

    def _item_added(self, item_id: str, item: dict, done: bool = False) -> None:
        self.send("conversation.item.added", previous_item_id=self._last_item, item=item)
        if done:
            self.send("conversation.item.done", previous_item_id=self._last_item, item=item)
        self._last_item = item_id

    def _id(self, kind: str) -> str:
        return f"{kind}_{next(self._ids):06d}{id(self) % 100000:05d}"

    def send(self, kind: str, **fields: Any) -> None:
        self._send({"type": kind, "event_id": self._id("event"), **fields})


def _server_vad(kind: str = "server_vad") -> dict:
    """What turn detection this server runs, as the Realtime API describes it (Silero and Smart
    Turn decide: the threshold and silence fields are reported, not used)."""
    return {"type": kind, "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
            "create_response": True, "interrupt_response": True, "idle_timeout_ms": None}


def _user_audio(item_id: str, transcript: str | None = None) -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": transcript}]}


async def serve_realtime(ws: WebSocket, engine: Engine, listening: Callable[[], Segmenter], cfg: Config,
                         slots: asyncio.Semaphore) -> None:
    """One ``/v1/realtime`` connection, from the handshake (the Gate checked the key) to its end:
    a client that goes away stops the work in progress."""
    await ws.accept()
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[dict | None] = asyncio.Queue()

    def send(event: dict) -> None:  # any thread
        loop.call_soon_threadsafe(out.put_nowait, event)

    if slots.locked():
        await ws.send_text(json.dumps({"type": "error", "event_id": "event_busy", "error": {
            "type": "server_error", "code": "server_busy", "param": None, "event_id": None,
            "message": "every realtime slot on this server is in use: try again shortly"}}))
        await ws.close(1013)
        return
    async with slots:
        try:
            segmenter = await asyncio.to_thread(listening)
            voices = await asyncio.to_thread(engine.voices)
        except Exception as exc:  # noqa: BLE001 - the VAD or Smart Turn would not load: say so, and end
            await ws.send_text(json.dumps({"type": "error", "event_id": "event_load", "error": {
                "type": "server_error", "code": "model_not_found", "param": None, "event_id": None,
                "message": str(exc)}}))
            await ws.close(1011)
            return
        session = Realtime(engine, segmenter, cfg, send, voices, ws.query_params.get("model") or "moi")
        session.start()

        async def sender() -> None:
            while (event := await out.get()) is not None:
                await ws.send_text(json.dumps(event))

        writing = asyncio.create_task(sender())
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text") if message.get("text") is not None else message.get("bytes")
                if raw is not None:
                    session.handle(raw)
        except WebSocketDisconnect:
            pass
        finally:
            await asyncio.to_thread(session.close)
            out.put_nowait(None)
            try:
                await asyncio.wait_for(writing, 2.0)
            except Exception:  # noqa: BLE001 - the socket is gone: nothing more can be said
                writing.cancel()


__all__ = ["Playhead", "Realtime", "RealtimeStages", "serve_realtime"]
