"""Engines that run somewhere else: any OpenAI-compatible gateway over HTTP, with failover.

:class:`RemoteEngine` speaks the plain OpenAI audio/chat API (``/v1/audio/transcriptions``,
``/v1/chat/completions`` streamed over SSE, ``/v1/audio/speech`` streamed as PCM), so it works
against our gateway (on Modal or ``moi serve``) and against any server that speaks that API.
Segments travel as compact PCM16 WAV.

:class:`FallbackEngine` wraps two engines: the utterance is the unit of work. A primary that
fails before its first byte (connect error, 5xx, timeout, a cold start past the deadline) is
retried on the fallback with the same input; a failure after the first byte of a streamed
answer ends the turn with a clear message (no half-reply spoken twice). A breaker keeps the
primary out for ``cooldown_s`` after a failure, then lets one call probe it again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import httpx

from shared.audio import SPEECH_RATE, Audio
from shared.errors import EngineError
from shared.messages import ChatOptions, Message, Segment, Transcription

KOKORO_RATE = 24_000
T = TypeVar("T")


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    api_key: str | None = None
    connect_timeout_s: float = 3.0
    first_byte_s: float = 15.0  # a cold start beyond this counts as a failure
    read_timeout_s: float = 30.0


class RemoteEngine:
    """The Engine protocol over an OpenAI-compatible HTTP gateway."""

    name = "remote"

    def __init__(self, cfg: RemoteConfig, client: httpx.Client | None = None) -> None:
        self.cfg = cfg
        base = cfg.url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        timeout = httpx.Timeout(cfg.first_byte_s, connect=cfg.connect_timeout_s)
        self.client = client or httpx.Client(base_url=base, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def _fail(self, what: str, exc: Exception) -> EngineError:
        if isinstance(exc, httpx.HTTPStatusError):
            try:
                message = exc.response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.response.text[:200]
            return EngineError(f"{what}: HTTP {exc.response.status_code} from {self.cfg.url}: {message}")
        return EngineError(f"{what}: {type(exc).__name__} talking to {self.cfg.url}: {exc}")

    def health(self) -> bool:
        try:
            root = str(self.client.base_url).rstrip("/").removesuffix("/v1")
            return self.client.get(f"{root}/health", timeout=self.cfg.connect_timeout_s).is_success
        except httpx.HTTPError:
            return False

    def transcribe(self, audio: Audio, *, language: str | None = None) -> Transcription:
        wav = audio.resample(SPEECH_RATE).to_wav()
        data = {"model": "whisper-1", "response_format": "verbose_json"}
        if language:
            data["language"] = language
        try:
            r = self.client.post("/audio/transcriptions", files={"file": ("utterance.wav", wav, "audio/wav")}, data=data)
            r.raise_for_status()
            body = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise self._fail("transcription", exc) from exc
        segments = tuple(
            Segment(s["start"], s["end"], s["text"].strip(), s.get("avg_logprob", 0.0), s.get("no_speech_prob", 0.0))
            for s in body.get("segments") or ()
        )
        return Transcription(body.get("text", "").strip(), segments, body.get("language"), body.get("duration", audio.seconds))

    def chat(
        self, thread: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        payload = {
            "model": "smollm2",
            "messages": [{"role": m.role, "content": m.content} for m in thread],
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
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            raise self._fail("chat", exc) from exc

    def speak(self, text: str, *, voice: str | None = None, cancel: threading.Event | None = None) -> Iterator[Audio]:
        payload = {"model": "kokoro", "input": text, "voice": voice or "auto", "response_format": "pcm"}
        min_bytes = KOKORO_RATE // 10 * 2  # hand on audio in pieces of at least 100 ms
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
                        yield Audio.from_pcm16(pending[:cut], KOKORO_RATE)
                        pending = pending[cut:]
                if len(pending) >= 2:
                    yield Audio.from_pcm16(pending[: len(pending) - len(pending) % 2], KOKORO_RATE)
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
    """``primary`` (e.g. remote) with ``fallback`` (e.g. local) taking over failed calls."""

    def __init__(self, primary, fallback, breaker: Breaker | None = None) -> None:  # noqa: ANN001 - Engines
        self.primary = primary
        self.fallback = fallback
        self.breaker = breaker or Breaker()
        self.fell_back = False  # within the current turn
        self.reasons: list[str] = []

    @property
    def name(self) -> str:
        if self.fell_back:
            return f"{self.primary.name} → {self.fallback.name}"
        return self.primary.name if self.breaker.allows else f"{self.fallback.name} ({self.primary.name} down)"

    def begin_turn(self) -> None:
        self.fell_back = False
        self.reasons = []

    def _switch(self, exc: Exception) -> None:
        self.breaker.failure()
        self.fell_back = True
        self.reasons.append(str(exc))

    def _call(self, primary: Callable[[], T], fallback: Callable[[], T]) -> T:
        if self.breaker.allows:
            try:
                result = primary()
                self.breaker.success()
                return result
            except EngineError as exc:
                self._switch(exc)
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
                if started:  # the reply is half out: end the turn rather than say it twice
                    self.breaker.failure()
                    raise EngineError(f"{what} failed mid-reply on {self.primary.name}: {exc}") from exc
                self._switch(exc)
        yield from fallback()

    def transcribe(self, audio: Audio, *, language: str | None = None) -> Transcription:
        return self._call(
            lambda: self.primary.transcribe(audio, language=language),
            lambda: self.fallback.transcribe(audio, language=language),
        )

    def chat(self, thread: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None) -> Iterator[str]:
        return self._stream(
            lambda: self.primary.chat(thread, options=options, cancel=cancel),
            lambda: self.fallback.chat(thread, options=options, cancel=cancel),
            "chat",
        )

    def speak(self, text: str, *, voice: str | None = None, cancel: threading.Event | None = None) -> Iterator[Audio]:
        return self._stream(
            lambda: self.primary.speak(text, voice=voice, cancel=cancel),
            lambda: self.fallback.speak(text, voice=voice, cancel=cancel),
            "speech",
        )
