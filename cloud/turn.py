"""One voice turn on the server: audio in → transcript → reply tokens → spoken sentences.

:func:`run_turn` is blocking and knows nothing about HTTP: it calls ``emit(header, payload)``
for each frame of the ``/v1/turn`` stream (see :mod:`shared.wire`), in order::

    transcript · token* · audio* · done

The reply is pipelined: the LLM runs in its own thread and hands finished sentences to the
caller's thread, which speaks them while the next sentence is still being generated.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud.streams import close_iterator
from shared.audio import Audio
from shared.messages import ChatOptions, Message
from shared.text import SentenceStream

if TYPE_CHECKING:
    from cloud.http import Backend

SPEECH_OUT_RATE = 24_000  # Kokoro's rate; every audio frame and /v1/audio/speech use it
Emit = Callable[[dict[str, Any], bytes], None]


class TurnBody(BaseModel):
    """The ``request`` part of a ``/v1/turn`` upload (JSON)."""

    model_config = ConfigDict(extra="ignore")
    messages: list[dict[str, Any]] = Field(default_factory=list)  # prior conversation, system first
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    voice: str | None = None
    language: str | None = None
    variant: Literal["chat", "echo", "transcribe"] = "chat"


@dataclass(frozen=True)
class TurnRequest:
    messages: tuple[Message, ...]
    options: ChatOptions
    voice: str | None  # None: the backend's default
    language: str | None
    variant: str


class _Clock:
    def __init__(self, started: float) -> None:
        self.started = started
        self.timings: dict[str, float | None] = dict.fromkeys(
            ("stt", "llm_first_token", "llm", "tts_first", "first_audio", "total")
        )

    def since(self, t: float) -> float:
        return round(time.monotonic() - t, 3)

    def mark(self, key: str, t: float) -> None:
        if self.timings[key] is None:
            self.timings[key] = self.since(t)


def run_turn(
    backend: Backend,
    audio: Audio,
    req: TurnRequest,
    emit: Emit,
    cancel: threading.Event,
    started: float | None = None,
) -> None:
    """Answer one utterance, emitting frames; ``started`` is when the audio arrived (monotonic)."""
    clock = _Clock(time.monotonic() if started is None else started)
    t = time.monotonic()
    tr = backend.transcribe(audio, language=req.language, prompt=None, word_timestamps=False)
    clock.timings["stt"] = clock.since(t)
    emit({"type": "transcript", "text": tr.text, "language": tr.language, "stt_s": clock.timings["stt"]}, b"")

    reply = ""
    if tr.text and req.variant == "echo":
        reply = tr.text
        _speak(backend, reply, req, emit, cancel, clock)
    elif tr.text and req.variant == "chat":
        reply = _chat_and_speak(backend, [*req.messages, Message("user", tr.text)], req, emit, cancel, clock)
    clock.timings["total"] = clock.since(clock.started)
    emit({"type": "done", "reply": reply, "timings": clock.timings}, b"")


def _speak(
    backend: Backend, text: str, req: TurnRequest, emit: Emit, cancel: threading.Event, clock: _Clock
) -> None:
    t = time.monotonic()
    pieces = backend.speak(text, voice=req.voice, speed=None, cancel=cancel)
    try:
        for piece, audio in pieces:
            clock.mark("tts_first", t)
            pcm = audio.resample(SPEECH_OUT_RATE).to_pcm16()
            header = {"type": "audio", "text": piece, "sample_rate": SPEECH_OUT_RATE, "format": "pcm16"}
            emit(header, pcm)
            clock.mark("first_audio", clock.started)
    finally:
        close_iterator(pieces)


def _chat_and_speak(
    backend: Backend,
    messages: list[Message],
    req: TurnRequest,
    emit: Emit,
    cancel: threading.Event,
    clock: _Clock,
) -> str:
    """Tokens are emitted as they come (LLM thread); sentences are spoken here meanwhile."""
    sentences: queue.Queue[str | BaseException | None] = queue.Queue()
    parts: list[str] = []

    def generate() -> None:
        splitter = SentenceStream()
        t = time.monotonic()
        tokens = backend.chat(messages, req.options, cancel)
        try:
            for token in tokens:
                clock.mark("llm_first_token", t)
                parts.append(token)
                emit({"type": "token", "text": token}, b"")
                for sentence in splitter.feed(token):
                    sentences.put(sentence)
            for sentence in splitter.flush():
                sentences.put(sentence)
            clock.timings["llm"] = clock.since(t)
            sentences.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the speaking thread, which raises it
            sentences.put(exc)
        finally:
            close_iterator(tokens)

    llm = threading.Thread(target=generate, name="moi-turn-llm", daemon=True)
    llm.start()
    try:
        while (item := sentences.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            _speak(backend, item, req, emit, cancel, clock)
    except BaseException:
        cancel.set()  # stop the LLM too: this turn is over
        raise
    finally:
        llm.join()
    return "".join(parts).strip()
