"""The gateway's routes, one router per area: models (and /health), audio (transcriptions,
speech), chat, turn, and the Realtime WebSocket. :func:`cloud.http.create_app` assembles them.

Every route reaches the app's one :class:`Gateway` (the engine, the limits, one admission door
per model) through the :func:`gateway` dependency. The API key is checked before any route, by
the :class:`cloud.gate.Gate` middleware: it answers 401 before a body is read and refuses a
WebSocket at its handshake, which a dependency (run once the body is parsed) could not.
Admission is not a dependency either: a stream holds its model's door until its last item, long
after the route returned (the release goes with the stream).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.requests import HTTPConnection

from cloud.admission import Admission, Capacity
from cloud.gate import as_api_error, log
from cloud.pipeline import listening as listen
from cloud.realtime import serve_realtime
from cloud.streams import END, Deadline, ThreadStream, cancel_on_disconnect, close_iterator, in_thread, iterate
from cloud.vad import Segmenter
from cloud.wire import (
    OPENAI_VOICES,
    SPEECH_FORMATS,
    TRANSCRIPTION_FORMATS,
    ApiError,
    ERROR_RESPONSES,
    ChatBody,
    SpeechBody,
    TurnBody,
    chat_options,
    chat_chunk,
    chat_completion,
    message_from_openai,
    pcm_rate,
    pick_voice,
    sse,
    to_srt,
    to_vtt,
    transcription_upload,
    turn_upload,
    usage,
    verbose_json,
    wav_stream_header,
)
from shared.audio import ENCODINGS, REPLY_RATE, Audio, Encoder, decode
from shared.config import Config
from shared.engine import Engine, TurnRequest
from shared.events import ErrorEvent, Event, ReplyAudio, to_wire
from shared.wire import encode_frame

@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 25 * 1024 * 1024  # any request body; OpenAI's limit for audio files
    max_audio_seconds: float = 600.0  # /v1/audio/transcriptions
    max_turn_seconds: float = 60.0  # /v1/turn: one utterance
    request_timeout_s: float = 120.0  # a whole answer, or a stream's first item and each gap after it → 504
    stt: Capacity = Capacity(running=2)  # per model: running at once, and waiting → else 429
    llm: Capacity = Capacity()
    tts: Capacity = Capacity()
    realtime_sessions: int = 4  # /v1/realtime connections at once; one more is told the server is busy


@dataclass
class Gateway:
    """What every route of one app shares: the engine and the limits it is served under."""

    engine: Engine
    limits: Limits = Limits()
    cfg: Config = field(default_factory=Config)
    listening: Callable[[], Segmenter] | None = None  # a Realtime connection's VAD + Smart Turn

    def __post_init__(self) -> None:
        self.doors = {role: Admission(role, getattr(self.limits, role)) for role in ("stt", "llm", "tts")}
        self.slots = asyncio.Semaphore(self.limits.realtime_sessions)
        if self.listening is None:
            cfg = self.cfg
            self.listening = lambda: listen(cfg)

    def deadline(self, start: float | None = None) -> Deadline:
        return Deadline(self.limits.request_timeout_s, start)

    def gap(self) -> Deadline:
        """A stream's next item is due within the time limit of its own: a long answer that
        keeps coming is never cut, a stalled one is."""
        return Deadline(self.limits.request_timeout_s)

    async def voice_or_default(self, until: Deadline, voice: str | None, param: str) -> str | None:
        """An installed voice for ``voice``: itself, or what an OpenAI name maps to."""
        if not voice or voice == "auto":
            return None
        voices = await in_thread(until, self.engine.voices)
        chosen = pick_voice(voice, voices)
        if chosen is None:
            raise ApiError(
                400,
                f"unknown voice {voice!r}; this server has: {', '.join(voices)} "
                f"(and maps OpenAI's {', '.join(OPENAI_VOICES)} onto them)",
                param=param,
                code="invalid_voice",
            )
        return chosen


def gateway(conn: HTTPConnection) -> Gateway:
    """The dependency every route takes: the app's Gateway."""
    return conn.app.state.gateway


health_router = APIRouter()
models_router = APIRouter(prefix="/v1")
audio_router = APIRouter(prefix="/v1")
chat_router = APIRouter(prefix="/v1")
turn_router = APIRouter(prefix="/v1")
realtime_router = APIRouter()
ROUTERS = (health_router, models_router, audio_router, chat_router, turn_router, realtime_router)


@health_router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}

@models_router.get("/models", responses=ERROR_RESPONSES)
async def models(gw: Gateway = Depends(gateway)) -> dict[str, Any]:
    found = await in_thread(gw.deadline(), gw.engine.models)
    return {"object": "list", "data": [{"object": "model", "created": 0, **m} for m in found]}

@audio_router.post(
    "/audio/transcriptions", openapi_extra=transcription_upload(), responses=ERROR_RESPONSES | {
        200: {"description": "the transcript", "content": {
            "application/json": {"schema": {"type": "object", "properties": {"text": {"type": "string"}}}},
            "text/plain": {"schema": {"type": "string"}}, "application/x-subrip": {"schema": {"type": "string"}},
            "text/vtt": {"schema": {"type": "string"}}}}})
async def transcriptions(request: Request, gw: Gateway = Depends(gateway)) -> Response:
    until = gw.deadline()
    form = await _form(request)
    upload = _upload(form, "file")
    fmt = _field(form, "response_format", "json")
    if fmt not in TRANSCRIPTION_FORMATS:
        raise ApiError(
            400,
            f"response_format {fmt!r}: use one of {', '.join(TRANSCRIPTION_FORMATS)}",
            param="response_format",
        )
    grains = set(form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities"))
    if grains - {"segment", "word"}:
        raise ApiError(
            400, "timestamp_granularities takes segment and/or word", param="timestamp_granularities"
        )
    if grains and fmt != "verbose_json":
        raise ApiError(
            400,
            "timestamp_granularities needs response_format=verbose_json",
            param="timestamp_granularities",
        )
    try:
        float(_field(form, "temperature", "0"))  # accepted for compatibility; beam search decides
    except ValueError:
        raise ApiError(400, "temperature must be a number", param="temperature") from None
    data = await upload.read()
    release = await gw.doors["stt"].enter(until)
    try:
        audio = await in_thread(
            until, decode, data, name=upload.filename or "file", max_seconds=gw.limits.max_audio_seconds
        )
        tr = await in_thread(
            until,
            gw.engine.transcribe,
            audio,
            language=_field(form, "language"),
            prompt=_field(form, "prompt"),
            word_timestamps="word" in grains,
        )
    finally:
        release()
    if fmt == "text":
        return PlainTextResponse(tr.text + "\n")
    if fmt == "srt":
        return PlainTextResponse(to_srt(tr), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(to_vtt(tr), media_type="text/vtt")
    if fmt == "verbose_json":
        return JSONResponse(
            verbose_json(tr, segments=not grains or "segment" in grains, words="word" in grains)
        )
    return JSONResponse({"text": tr.text})

@chat_router.post("/chat/completions", responses=ERROR_RESPONSES | {
    200: {"description": "the reply: JSON, or server-sent events with `stream`", "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {  # each event: `data:` a chat.completion.chunk, or [DONE]
            "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}}})
async def chat_completions(body: ChatBody, request: Request, gw: Gateway = Depends(gateway)) -> Response:
    until = gw.deadline()
    messages = [message_from_openai(i, m.model_dump()) for i, m in enumerate(body.messages)]
    options = chat_options(body.max_completion_tokens or body.max_tokens, body.temperature, body.seed,
                           stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()))
    cid, created, cancel = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), threading.Event()
    release = await gw.doors["llm"].enter(until)
    stream = ThreadStream(iterate(lambda: gw.engine.chat(messages, options=options, cancel=cancel)), cancel, release)
    piece = await stream.first(until)

    def finish(n: int) -> str:
        return "length" if n >= options.max_tokens else "stop"

    if not body.stream:
        pieces = []
        try:
            async with cancel_on_disconnect(request, cancel):  # no write would notice a client gone
                while piece is not END:
                    pieces.append(piece)
                    piece = await stream.next(until)
        finally:
            cancel.set()
        text = "".join(pieces)
        return JSONResponse(
            chat_completion(cid, created, body.model, text, finish(len(pieces)), len(pieces))
        )

    async def events(piece: Any) -> AsyncIterator[bytes]:
        n = 0
        try:
            yield sse(chat_chunk(cid, created, body.model, {"role": "assistant", "content": ""}))
            while piece is not END:
                n += 1
                yield sse(chat_chunk(cid, created, body.model, {"content": piece}))
                piece = await stream.next(gw.gap())
            yield sse(chat_chunk(cid, created, body.model, {}, finish(n)))
            if (body.stream_options or {}).get("include_usage"):
                yield sse({**chat_chunk(cid, created, body.model, {}), "choices": [], "usage": usage(n)})
            yield sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - headers are out: report it in-stream, as OpenAI does
            yield sse(as_api_error(exc).body())
        finally:
            cancel.set()  # also on disconnect (CancelledError): stops generation

    return StreamingResponse(
        events(piece), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )

@audio_router.post("/audio/speech", response_class=Response, responses=ERROR_RESPONSES | {
    200: {"description": "the speech, streamed sentence by sentence", "content": {
        media: {"schema": {"type": "string", "format": "binary"}}
        for media in ("audio/wav", f"audio/pcm;rate={REPLY_RATE}", *(e[3] for e in ENCODINGS.values()))}}})
async def speech(body: SpeechBody, gw: Gateway = Depends(gateway)) -> Response:
    until = gw.deadline()
    if body.response_format not in SPEECH_FORMATS:
        raise ApiError(
            400,
            f"response_format {body.response_format!r} is not supported: use one of "
            f"{', '.join(SPEECH_FORMATS)} (pcm: PCM16 mono {REPLY_RATE} Hz)",
            param="response_format",
            code="unsupported_format",
        )
    if not any(c.isalnum() for c in body.input):
        raise ApiError(400, "input has no words to speak: send the text to speak", param="input")
    voice = await gw.voice_or_default(until, body.voice, "voice")
    cancel = threading.Event()

    fmt = body.response_format

    def produce(emit: Any) -> None:  # in the stream's thread, off the event loop
        encoder = Encoder(fmt) if fmt in ENCODINGS else None
        pieces = gw.engine.speak(body.input, voice=voice, speed=body.speed, cancel=cancel)
        try:
            for piece in pieces:
                emit(encoder.feed(piece.audio) if encoder else piece.audio.resample(REPLY_RATE).to_pcm16())
            if encoder is not None:
                emit(encoder.close())
        finally:
            close_iterator(pieces)

    stream = ThreadStream(produce, cancel, await gw.doors["tts"].enter(until))
    chunk = await stream.first(until)

    async def audio(chunk: Any) -> AsyncIterator[bytes]:
        try:
            if body.response_format == "wav":
                yield wav_stream_header(REPLY_RATE)
            while chunk is not END:
                yield chunk
                chunk = await stream.next(gw.gap())
        except Exception as exc:  # nowhere to say so inside audio: log it, and cut the connection
            log.error("speech stream failed after its first sentence: %s", exc)
            raise
        finally:
            cancel.set()

    media = {"wav": "audio/wav", "pcm": f"audio/pcm;rate={REPLY_RATE}"}.get(fmt) or ENCODINGS[fmt][3]
    return StreamingResponse(audio(chunk), media_type=media)

@turn_router.post("/turn", response_class=Response, openapi_extra=turn_upload(), responses=ERROR_RESPONSES | {
    200: {"description": "the turn's events as frames (shared/wire.py), as they exist", "content": {
        "application/x-moi-frames": {"schema": {"type": "string", "format": "binary"}}}}})
async def turn(request: Request, gw: Gateway = Depends(gateway)) -> Response:
    until = gw.deadline()
    form = await _form(request)
    req = await _turn_request(form)
    upload = _upload(form, "audio")
    data = await upload.read()
    rate = pcm_rate(upload.content_type or "")
    if rate is not None:
        _check_length(len(data) / 2 / rate, gw.limits.max_turn_seconds, "the utterance", "audio")
        audio = Audio.from_pcm16(data, rate)
    else:
        audio = await in_thread(
            until, decode, data, name=upload.filename or "audio", max_seconds=gw.limits.max_turn_seconds
        )
    if req.variant != "transcribe":
        voice = await gw.voice_or_default(until, req.voice, "request.voice")
        req = replace(req, voice=voice)
    cancel = threading.Event()

    def frame(event: Event) -> bytes:  # in the stream's thread
        if isinstance(event, ReplyAudio) and event.audio.sample_rate != REPLY_RATE:
            event = replace(event, audio=event.audio.resample(REPLY_RATE))
        return encode_frame(*to_wire(event))

    release = await gw.doors["llm"].enter(until)  # a turn holds the LLM's door for its whole length
    stream = ThreadStream(iterate(lambda: gw.engine.turn(audio, req, cancel=cancel), frame), cancel, release)
    first = await stream.first(until)  # the transcript: an STT failure still gets a status code

    async def frames(item: Any) -> AsyncIterator[bytes]:
        try:
            while item is not END:
                yield item
                item = await stream.next(gw.gap())
        except Exception as exc:  # noqa: BLE001 - headers are out: an error frame ends the turn
            err = as_api_error(exc)
            yield encode_frame(*to_wire(ErrorEvent(0.0, err.message, req.turn)))
        finally:
            cancel.set()  # also on disconnect (Stop on the client): generation ends

    return StreamingResponse(frames(first), media_type="application/x-moi-frames")

@realtime_router.websocket("/v1/realtime")
async def realtime(ws: WebSocket, gw: Gateway = Depends(gateway)) -> None:
    """OpenAI's Realtime API (cloud/realtime.py): the Gate has checked the key."""
    await serve_realtime(ws, gw.engine, gw.listening, gw.cfg, gw.slots)


# --- request parsing -----------------------------------------------------------------------


async def _form(request: Request) -> FormData:
    return await request.form(max_files=4, max_fields=64)


def _field(form: FormData, name: str, default: str | None = None) -> str | None:
    value = form.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ApiError(400, f"`{name}` must be a form field, not a file", param=name)
    return value


def _upload(form: FormData, name: str) -> UploadFile:
    value = form.get(name)
    if not isinstance(value, UploadFile):
        raise ApiError(400, f"send the audio as a multipart file field named `{name}`", param=name)
    return value


def _check_length(seconds: float, limit: float, what: str, param: str) -> None:
    if seconds > limit:
        raise ApiError(
            400,
            f"{what} is {seconds:.1f} s long; the limit is {limit:g} s",
            param=param,
            code="audio_too_long",
        )


async def _turn_request(form: FormData) -> TurnRequest:
    raw = form.get("request")
    if isinstance(raw, UploadFile):
        raw = (await raw.read()).decode("utf-8", errors="replace")
    try:
        body = TurnBody.model_validate_json(raw or "{}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
        raise ApiError(400, f"bad `request` JSON: {problems}", param="request") from None
    return body.request()


__all__ = ["Gateway", "Limits", "ROUTERS", "gateway"]
