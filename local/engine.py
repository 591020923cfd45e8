"""The Engine protocol the pipeline talks to, and the in-process engine.

An Engine transcribes, chats and speaks; where it runs is its own business: in this process
(:class:`LocalEngine` over cloud/ runners), over HTTP, or on Modal (the Cloud issue adds
those; a fallback engine wraps two).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

from cloud.runners import Runners
from shared.audio import Audio
from shared.config import Config
from shared.messages import ChatOptions, Message, Transcription


class Engine(Protocol):
    name: str

    def transcribe(self, audio: Audio, *, language: str | None = None) -> Transcription: ...

    def chat(
        self, thread: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]: ...

    def speak(
        self, text: str, *, voice: str | None = None, cancel: threading.Event | None = None
    ) -> Iterator[Audio]: ...


class LocalEngine:
    """Everything in this process, on the cloud/ runners (offline with the shipped packs)."""

    name = "local"

    def __init__(self, cfg: Config = Config(), runners: Runners | None = None) -> None:
        self.cfg = cfg
        self.runners = runners or Runners(cfg)

    def warm(self, roles: tuple[str, ...] = ("stt", "llm", "tts")) -> None:
        self.runners.warm(roles)

    def transcribe(self, audio: Audio, *, language: str | None = None) -> Transcription:
        return self.runners.stt.transcribe(audio, language=language)

    def chat(
        self, thread: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        return self.runners.chat.stream(thread, options, cancel)

    def speak(
        self, text: str, *, voice: str | None = None, cancel: threading.Event | None = None
    ) -> Iterator[Audio]:
        for _piece, audio in self.runners.tts.speak(text, voice=voice, cancel=cancel):
            yield audio


class BackendEngine:
    """The Engine protocol over a gateway ``Backend`` (``cloud.http.Backend``), e.g. the
    deployed Modal classes through the Modal SDK (``modal_app.ModalBackend.deployed()``)."""

    def __init__(self, backend, name: str = "modal") -> None:  # noqa: ANN001 - a cloud.http.Backend
        self.backend = backend
        self.name = name

    def transcribe(self, audio: Audio, *, language: str | None = None) -> Transcription:
        return self.backend.transcribe(audio, language=language, prompt=None, word_timestamps=False)

    def chat(
        self, thread: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        return self.backend.chat(list(thread), options, cancel)

    def speak(
        self, text: str, *, voice: str | None = None, cancel: threading.Event | None = None
    ) -> Iterator[Audio]:
        for _piece, audio in self.backend.speak(text, voice=voice, speed=None, cancel=cancel):
            yield audio
