"""Engines that run somewhere else: our gateway (or any OpenAI-compatible one) over HTTP, and failover.

:class:`HttpEngine` answers a turn with **one** request to ``/v1/turn``: the utterance goes up
as PCM16 with the conversation, and the turn's events (transcript, tokens, reply audio,
timings) stream back as frames (:mod:`shared.wire`) as soon as the server has them, so the
first reply audio leaves the server the moment it is synthesized. Its single calls use the
plain OpenAI endpoints (``/v1/audio/transcriptions``, ``/v1/chat/completions`` over SSE,
``/v1/audio/speech``), so they work against any server that speaks that API.

:class:`FallbackEngine` wraps two engines: the utterance is the unit of work (see its doc). A
:class:`Breaker` keeps a failed primary out for ``cooldown_s``, then lets one turn probe it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import httpx

from cloud.wire import TurnBody
from shared.audio import REPLY_RATE, SPEECH_RATE, Audio
from shared.engine import Clock, Engine, Speech, Stopwatch, TurnRequest, when_cancelled
from shared.errors import EngineError
from shared.events import (
    ErrorEvent,
    Event,
    FallbackUsed,
    ReplyAudio,
    ReplyText,
    ReplyToken,
    Transcript,
    TurnDone,
    from_wire,
)
from shared.messages import ChatOptions, Message, Segment, Transcription, Word
from shared.wire import FrameReader

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    api_key: str | None = None
    connect_timeout_s: float = 3.0
    first_byte_s: float = 15.0  # a cold start beyond this counts as a failure
    read_timeout_s: float = 30.0


class HttpEngine:
    """The Engine protocol over HTTP: a turn is one ``/v1/turn`` request; transcribe, chat and
    speak use the standard OpenAI endpoints (so they work against any such server)."""

    name = "remote"

    def __init__(self, cfg: RemoteConfig, client: httpx.Client | None = None) -> None:
        self.cfg = cfg
        base = cfg.url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        timeout = httpx.Timeout(cfg.first_byte_s, connect=cfg.connect_timeout_s)
        self.client = client or httpx.Client(base_url=base, headers=headers, timeout=timeout)
        self._models: list[dict] | None = None

    def close(self) -> None:
        self.client.close()

    def warm(self, roles: tuple[str, ...] = ("stt", "llm", "tts")) -> None:
        """Nothing loads here: the server holds the models."""

    def _fail(self, what: str, exc: Exception) -> EngineError:
        if isinstance(exc, httpx.HTTPStatusError):
            try:
                message = exc.response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError, httpx.ResponseNotRead):
                message = exc.response.text[:200] if exc.response.is_stream_consumed else ""
            return EngineError(f"{what}: HTTP {exc.response.status_code} from {self.cfg.url}: {message}")
        return EngineError(f"{what}: {type(exc).__name__} talking to {self.cfg.url}: {exc}")

    def health(self) -> bool:
        try:
            root = str(self.client.base_url).rstrip("/").removesuffix("/v1")
            return self.client.get(f"{root}/health", timeout=self.cfg.connect_timeout_s).is_success
        except httpx.HTTPError:
            return False

    # --- a turn: one request, frames streamed back ---------------------------------------

    def turn(
        self, audio: Audio, request: TurnRequest, *, cancel: threading.Event, clock: Clock | None = None
    ) -> Iterator[Event]:
        """POST the utterance (PCM16) with the conversation; yield each frame's event as it
        arrives. Stop (``cancel``) shuts the connection at once, and the server, seeing the
        client gone, stops generating; this side then ends the turn as cancelled."""
        clock = clock or Stopwatch()
        t0 = clock()
        body = TurnBody.of(request).model_dump_json()
        pcm = audio.resample(SPEECH_RATE).to_pcm16()
        files = {"audio": ("utterance.pcm", pcm, f"audio/L16;rate={SPEECH_RATE}")}
        tokens: list[str] = []
        first_audio: float | None = None
        ended = False
        try:
            with self.client.stream("POST", "/turn", data={"request": body}, files=files) as r:
                if r.is_error:
                    r.read()
                    r.raise_for_status()
                with _shut_on(cancel, r):
                    reader = FrameReader()
                    for chunk in r.iter_bytes():
                        for header, payload in reader.feed(chunk):
                            ev = from_wire(header, payload, clock())
                            if isinstance(ev, ErrorEvent):
                                raise EngineError(f"turn: {ev.message} (from {self.cfg.url})")
                            if isinstance(ev, ReplyToken):
                                tokens.append(ev.text)
                            elif isinstance(ev, ReplyAudio) and first_audio is None:
                                first_audio = clock() - t0
                            elif isinstance(ev, TurnDone):  # as this side saw it, not the server
                                timings = {**ev.timings, "total": round(clock() - t0, 3)}
                                if first_audio is not None:
                                    timings["first_audio"] = round(first_audio, 3)
                                ev = replace(ev, engine=self.name, timings=timings)
                                ended = True
                            yield ev
                    reader.close()
        except (httpx.HTTPError, ValueError, EngineError) as exc:
            if not cancel.is_set():
                raise exc if isinstance(exc, EngineError) else self._fail("turn", exc) from exc
        if not ended:
            if not cancel.is_set():
                raise EngineError(f"turn: the stream from {self.cfg.url} ended before the turn did")
            if request.variant == "chat" and tokens:  # Stop: the turn ends here, as a local one would
                yield ReplyText(clock(), request.turn, "".join(tokens).strip(), cancelled=True)
            yield TurnDone(clock(), request.turn, self.name, {"total": round(clock() - t0, 3)})

    # --- the OpenAI endpoints ------------------------------------------------------------

    def models(self) -> list[dict]:
        if self._models is None:
            try:
                r = self.client.get("/models", timeout=self.cfg.connect_timeout_s + self.cfg.first_byte_s)
                r.raise_for_status()
                self._models = list(r.json()["data"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                raise self._fail("models", exc) from exc
        return self._models

    def voices(self) -> list[str]:
        return [v for m in self.models() if m.get("role") == "tts" for v in m.get("voices", ())]

    def transcribe(
        self, audio: Audio, *, language: str | None = None, prompt: str | None = None,
        word_timestamps: bool = False,
    ) -> Transcription:
        wav = audio.resample(SPEECH_RATE).to_wav()
        data: dict[str, Any] = {"model": "whisper-1", "response_format": "verbose_json"}
        if language:
            data["language"] = language
        if prompt:
            data["prompt"] = prompt
        if word_timestamps:
            data["timestamp_granularities[]"] = ["segment", "word"]
        try:
            r = self.client.post("/audio/transcriptions", files={"file": ("utterance.wav", wav, "audio/wav")}, data=data)
            r.raise_for_status()
            body = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise self._fail("transcription", exc) from exc
        try:
            segments = tuple(
                Segment(
                    s["start"], s["end"], s["text"].strip(), s.get("avg_logprob", 0.0), s.get("no_speech_prob", 0.0),
                    words=tuple(
                        Word(w["start"], w["end"], w["word"], w.get("probability", 1.0))
                        for w in body.get("words") or () if s["start"] <= w["start"] < s["end"]
                    ),
                )
                for s in body.get("segments") or ()
            )
            return Transcription(
                str(body.get("text", "")).strip(), segments, body.get("language"), body.get("duration", audio.seconds)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"transcription: an answer of an unexpected shape from {self.cfg.url}: {exc!r}") from exc

    def chat(
        self, messages: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        payload = {
            "model": "smollm2",
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "seed": options.seed,
        }
        try:
            with self.client.stream("POST", "/chat/completions", json=payload) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if cancel is not None and cancel.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise EngineError(f"chat: {chunk['error'].get('message')}")
                    piece = (chunk["choices"][0].get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise self._fail("chat", exc) from exc

    def speak(
        self, text: str, *, voice: str | None = None, speed: float | None = None,
        cancel: threading.Event | None = None, split: bool = True,
    ) -> Iterator[Speech]:
        """The speech of ``text`` in pieces of at least 100 ms as they stream in (OpenAI's
        endpoint splits as it likes: ``split`` has no say over HTTP)."""
        payload = {"model": "kokoro", "input": text, "voice": voice or "auto", "response_format": "pcm"}
        if speed is not None:
            payload["speed"] = speed
        min_bytes = REPLY_RATE // 10 * 2
        try:
            with self.client.stream("POST", "/audio/speech", json=payload) as r:
                r.raise_for_status()
                pending = b""
                for chunk in r.iter_bytes():
                    if cancel is not None and cancel.is_set():
                        return
                    pending += chunk
                    if len(pending) >= min_bytes:
                        cut = len(pending) - len(pending) % 2
                        yield Speech(text, Audio.from_pcm16(pending[:cut], REPLY_RATE))
                        pending = pending[cut:]
                if len(pending) >= 2:
                    yield Speech(text, Audio.from_pcm16(pending[: len(pending) - len(pending) % 2], REPLY_RATE))
        except httpx.HTTPError as exc:
            raise self._fail("speech", exc) from exc


class Breaker:
    """Closed: use the primary. Open (after a failure): skip it for ``cooldown_s``; then one
    call probes it (half-open) and a success closes the breaker again."""

    def __init__(self, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.opened_at: float | None = None

    @property
    def allows(self) -> bool:
        return self.opened_at is None or self.clock() - self.opened_at >= self.cooldown_s

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.allows else "open"

    def success(self) -> None:
        self.opened_at = None

    def failure(self) -> None:
        self.opened_at = self.clock()


class FallbackEngine:
    """``primary`` (e.g. remote) with ``fallback`` (e.g. local) taking over failed work.

    The utterance is the unit of work. A turn whose primary fails before any of the reply
    (connect error, HTTP error, a cold start past the first-byte deadline, the server dying
    after the transcript) is answered by the fallback with the same audio, or from the
    transcript the primary already gave; a failure after reply tokens or audio went out ends
    the turn with one clear error (no half-reply spoken twice). Each turn's ``TurnDone`` names
    who answered it: ``remote``, ``remote → local`` (fell back in this turn) or ``local (remote
    down)`` (the breaker kept the primary out).
    """

    def __init__(self, primary: Engine, fallback: Engine, breaker: Breaker | None = None) -> None:
        self.primary = primary
        self.fallback = fallback
        self.breaker = breaker or Breaker()

    @property
    def name(self) -> str:
        """Who would answer now (for a status badge); each turn says who actually did."""
        return self.primary.name if self.breaker.allows else self._down

    @property
    def _down(self) -> str:
        return f"{self.fallback.name} ({self.primary.name} down)"

    @property
    def _switched(self) -> str:
        return f"{self.primary.name} → {self.fallback.name}"

    def warm(self, roles: tuple[str, ...] = ("stt", "llm", "tts")) -> None:
        self.primary.warm(roles)
        self.fallback.warm(roles)

    def turn(
        self, audio: Audio, request: TurnRequest, *, cancel: threading.Event, clock: Clock | None = None
    ) -> Iterator[Event]:
        clock = clock or Stopwatch()
        if not self.breaker.allows:
            yield from _labelled(self.fallback.turn(audio, request, cancel=cancel, clock=clock), self._down)
            return
        heard: str | None = None
        replied = False
        try:
            for ev in self.primary.turn(audio, request, cancel=cancel, clock=clock):
                if isinstance(ev, Transcript):
                    heard = ev.text
                elif isinstance(ev, (ReplyToken, ReplyAudio, ReplyText)):
                    replied = True
                yield ev
        except Exception as exc:  # noqa: BLE001 - any failure of the primary is the fallback's cue
            self.breaker.failure()
            if replied:  # the reply is half out: end the turn rather than say it twice
                raise EngineError(f"the reply failed mid-way on {self.primary.name}: {exc}") from exc
            yield FallbackUsed(clock(), request.turn, self._switched, str(exc))
            rest = request if heard is None else replace(request, text=heard)
            yield from _labelled(self.fallback.turn(audio, rest, cancel=cancel, clock=clock), self._switched)
            return
        self.breaker.success()

    # --- single calls (the gateway's endpoints over a failover pair) ---------------------

    def _call(self, primary: Callable[[], T], fallback: Callable[[], T]) -> T:
        if self.breaker.allows:
            try:
                result = primary()
                self.breaker.success()
                return result
            except EngineError:
                self.breaker.failure()
        return fallback()

    def _stream(self, primary: Callable[[], Iterator[T]], fallback: Callable[[], Iterator[T]], what: str) -> Iterator[T]:
        if self.breaker.allows:
            started = False
            try:
                for item in primary():
                    started = True
                    yield item
                self.breaker.success()
                return
            except EngineError as exc:
                self.breaker.failure()
                if started:
                    raise EngineError(f"{what} failed mid-way on {self.primary.name}: {exc}") from exc
        yield from fallback()

    def transcribe(
        self, audio: Audio, *, language: str | None = None, prompt: str | None = None,
        word_timestamps: bool = False,
    ) -> Transcription:
        kw = dict(language=language, prompt=prompt, word_timestamps=word_timestamps)
        return self._call(lambda: self.primary.transcribe(audio, **kw), lambda: self.fallback.transcribe(audio, **kw))

    def chat(
        self, messages: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        return self._stream(
            lambda: self.primary.chat(messages, options=options, cancel=cancel),
            lambda: self.fallback.chat(messages, options=options, cancel=cancel),
            "chat",
        )

    def speak(
        self, text: str, *, voice: str | None = None, speed: float | None = None,
        cancel: threading.Event | None = None, split: bool = True,
    ) -> Iterator[Speech]:
        kw = dict(voice=voice, speed=speed, cancel=cancel, split=split)
        return self._stream(lambda: self.primary.speak(text, **kw), lambda: self.fallback.speak(text, **kw), "speech")

    def voices(self) -> list[str]:
        return self._call(self.primary.voices, self.fallback.voices)

    def models(self) -> list[dict]:
        return self._call(self.primary.models, self.fallback.models)


def _labelled(events: Iterator[Event], engine: str) -> Iterator[Event]:
    """The fallback's events, its TurnDone naming the path the turn really took."""
    for ev in events:
        yield replace(ev, engine=engine) if isinstance(ev, TurnDone) else ev


@contextmanager
def _shut_on(cancel: threading.Event, response: httpx.Response) -> Iterator[None]:
    """While the block runs, setting ``cancel`` shuts the response's socket: a read blocked on
    the server (mid-synthesis) returns at once, and the server sees the client gone."""
    def shut() -> None:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    with when_cancelled(cancel.is_set, shut, "moi-turn-stop", every_s=0.02):
        yield
