"""The in-process engine: the :class:`shared.engine.Engine` protocol over this process's runners.

The laptop's ``--local`` pipeline, its fallback, ``moi serve`` and the gateway's ``/v1/turn``
all answer through it, and its turns are :func:`cloud.turn.run_turn`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

from cloud.runners import Runners
from cloud.streams import close_iterator
from cloud.turn import run_turn
from shared.audio import Audio
from shared.config import Config
from shared.engine import Clock, Speech, TurnRequest
from shared.events import Event
from shared.messages import ChatOptions, Message, Transcription

T = TypeVar("T")


class SpeechFirst:
    """Who gets the cores when the LLM and TTS share one CPU: speech.

    llama.cpp and onnxruntime each start a thread per core and spin while they wait, so run side
    by side on a small CPU they thrash and both slow down several-fold (measured: first audio
    2.9-3.1 s pipelined vs 2.8 s serial on 2 cores). While a piece is being synthesized the LLM
    waits between tokens; the rest of the time it runs at full speed, ahead of the speaker. The
    first audio is then as early as a serial turn's, and tokens still stream as they come.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._speaking = 0

    @contextmanager
    def speaking(self) -> Iterator[None]:
        with self._cond:
            self._speaking += 1
        try:
            yield
        finally:
            with self._cond:
                self._speaking -= 1
                self._cond.notify_all()

    def wait(self, cancel: threading.Event | None = None) -> None:
        """Until no piece is being synthesized (or ``cancel`` is set)."""
        with self._cond:
            while self._speaking and not (cancel is not None and cancel.is_set()):
                self._cond.wait(0.05)


class LocalEngine:
    """Everything in this process, on the cloud/ runners (offline with the shipped packs)."""

    name = "local"

    def __init__(self, cfg: Config = Config(), runners: Runners | None = None) -> None:
        self.cfg = cfg
        self.runners = runners or Runners(cfg)
        self.share = SpeechFirst()

    def _shared_cpu(self) -> bool:
        return self.runners.chat.device == "cpu" and self.runners.tts.device == "cpu"

    def warm(self, roles: tuple[str, ...] = ("stt", "llm", "tts")) -> None:
        self.runners.warm(roles)

    def transcribe(
        self, audio: Audio, *, language: str | None = None, prompt: str | None = None,
        word_timestamps: bool = False,
    ) -> Transcription:
        return self.runners.stt.transcribe(audio, language=language, prompt=prompt, word_timestamps=word_timestamps)

    def chat(
        self, messages: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        tokens = self.runners.chat.stream(messages, options, cancel)
        if not self._shared_cpu():
            return tokens
        return self._yielding(tokens, cancel)

    def _yielding(self, tokens: Iterator[str], cancel: threading.Event | None) -> Iterator[str]:
        @contextmanager
        def after_speech() -> Iterator[None]:
            self.share.wait(cancel)  # a piece is being spoken: let it have the cores
            yield

        return _pulled(tokens, after_speech)

    def prepare(self, messages: Sequence[Message]) -> None:
        """The next turn will start with ``messages``: let the chat model evaluate them now, in
        the background, where it can (llama.cpp)."""
        prefill = getattr(self.runners.chat, "prefill", None)
        if prefill is not None:
            prefill(messages)

    def speak(
        self, text: str, *, voice: str | None = None, speed: float | None = None,
        cancel: threading.Event | None = None, split: bool = True,
    ) -> Iterator[Speech]:
        pieces = self.runners.tts.speak(text, voice=voice, speed=speed, cancel=cancel, split=split)
        if not self._shared_cpu():
            return pieces
        return _pulled(pieces, self.share.speaking)

    def turn(
        self, audio: Audio, request: TurnRequest, *, cancel: threading.Event, clock: Clock | None = None
    ) -> Iterator[Event]:
        return run_turn(self, audio, request, cancel=cancel, clock=clock, tts=self.cfg.tts)

    def voices(self) -> list[str]:
        return list(self.runners.tts.voices)

    def models(self) -> list[dict]:
        out = [{"id": self.runners.model(r).name, "role": r, "owned_by": "moi"} for r in ("stt", "llm", "tts")]
        out[-1]["voices"] = self.voices()
        return out


def _pulled(items: Iterator[T], around: Callable[[], AbstractContextManager[object]]) -> Iterator[T]:
    """``items``, each one computed inside ``around()``; closed with this generator."""
    try:
        while True:
            with around():
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item
    finally:
        close_iterator(items)


__all__ = ["LocalEngine", "SpeechFirst"]
