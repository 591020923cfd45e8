"""The one Engine protocol: what the pipeline, the gateway and batch talk to.

An engine transcribes, chats and speaks, and answers a whole voice **turn**: one utterance plus
the conversation so far in, a stream of typed events out (:mod:`shared.events`)::

    Transcript · (ReplyToken | ReplyAudio)* · ReplyText · TurnDone      (or ErrorEvent)

Where it runs is the engine's own business: in this process (``cloud.engine.LocalEngine``,
which also serves the gateway), over one HTTP request per turn (``local.remote.HttpEngine``
against ``/v1/turn``), on Modal (``modal_app.ModalEngine``), or as a failover pair
(``local.remote.FallbackEngine``). Every one implements every method below; nothing probes for
optional attributes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from shared.audio import Audio
from shared.events import Event
from shared.messages import ChatOptions, Message, Transcription

Variant = Literal["transcribe", "echo", "chat"]
VARIANTS: tuple[Variant, ...] = ("transcribe", "echo", "chat")
ROLES_FOR: dict[str, tuple[str, ...]] = {"transcribe": ("stt",), "echo": ("stt", "tts"), "chat": ("stt", "llm", "tts")}

#: A clock for event timestamps: seconds on a monotonic clock since some start.
Clock = Callable[[], float]


class Speech(NamedTuple):
    """One spoken piece: the text it says and its audio."""

    text: str
    audio: Audio


@dataclass(frozen=True)
class TurnRequest:
    """Everything a turn needs besides the audio. The client owns the conversation: ``messages``
    is the thread so far (the system prompt first, once), without the new utterance."""

    messages: tuple[Message, ...] = ()
    options: ChatOptions = field(default_factory=ChatOptions)
    variant: Variant = "chat"
    voice: str | None = None  # None: the engine's default
    language: str | None = None
    turn: int = 0  # the client's turn number, put on every event
    text: str | None = None  # a transcript already known (failover after it): STT is skipped


@dataclass
class Stopwatch:
    """A :data:`Clock`: seconds on the monotonic clock since ``start`` (default: now)."""

    start: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        return time.monotonic() - self.start


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its ``threading`` name) in the OS as well
    (``top -H``, ``/proc``: bench/idle.py splits the CPU by it); Python 3.11 names only its own
    Thread objects. Linux only (a name is cut to 15 bytes); elsewhere, or should it fail,
    nothing happens."""
    if sys.platform != "linux":
        return
    name = name or threading.current_thread().name
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


@contextmanager
def when_cancelled(fired: Callable[[], bool], act: Callable[[], None], name: str, every_s: float = 0.01,
                   ) -> Iterator[None]:
    """While the block runs, a thread asks ``fired`` every ``every_s`` and calls ``act`` once when
    it says yes: Stop reaching work that cannot look for it itself (an onnxruntime run, a socket
    read, a GPU container). The thread is joined when the block ends."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every_s):
            if fired():
                act()
                return

    watcher = threading.Thread(target=watch, name=name, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


class Engine(Protocol):
    name: str  # what answers: "local", "remote", "modal", "remote → local", ...

    def transcribe(
        self, audio: Audio, *, language: str | None = None, prompt: str | None = None,
        word_timestamps: bool = False,
    ) -> Transcription: ...

    def chat(
        self, messages: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]: ...

    def speak(
        self, text: str, *, voice: str | None = None, speed: float | None = None,
        cancel: threading.Event | None = None, split: bool = True,
    ) -> Iterator[Speech]:
        """``text`` spoken piece by piece (sentences, the first clause early); ``split=False``
        speaks it as the one piece it is (a turn's pieces are cut once, by the turn)."""
        ...

    def turn(
        self, audio: Audio, request: TurnRequest, *, cancel: threading.Event, clock: Clock | None = None
    ) -> Iterator[Event]:
        """Answer one utterance. A failure raises (the caller turns it into an ``ErrorEvent``);
        setting ``cancel`` ends generation and synthesis at the next token or piece."""
        ...

    def voices(self) -> list[str]: ...

    def models(self) -> list[dict]: ...

    def warm(self, roles: tuple[str, ...] = ("stt", "llm", "tts")) -> None:
        """Load what ``roles`` need now rather than on the first turn (a no-op where nothing loads here)."""
        ...


__all__ = ["Clock", "Engine", "ROLES_FOR", "Speech", "TurnRequest", "Stopwatch", "VARIANTS", "Variant", "name_os_thread"]
