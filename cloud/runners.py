"""The three model runners of one process, built on first use from one Config.

The HTTP gateway, the local engine and the Modal classes all hold a :class:`Runners`; each
runner loads once (thread-safe) and is shared by everyone in the process.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol, TypeVar

from shared.config import Config
from shared.errors import EngineError
from shared.models import ResolvedModel, resolve

if TYPE_CHECKING:
    from cloud.chat import ChatBackend
    from cloud.stt import SpeechToText
    from cloud.tts import TextToSpeech


class _Placed(Protocol):
    device: str  # "cpu", "cuda", ...


R = TypeVar("R", bound=_Placed)


class Runners:
    """``device``: where every model must end up (``"cuda"`` in the GPU classes); a model that
    loads anywhere else raises instead of quietly serving from the CPU. None: wherever it lands."""

    def __init__(self, cfg: Config = Config(), device: str | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self._lock = threading.Lock()
        self._stt: SpeechToText | None = None
        self._chat: ChatBackend | None = None
        self._tts: TextToSpeech | None = None

    def model(self, role: str) -> ResolvedModel:
        spec = {"stt": self.cfg.stt.model, "llm": self.cfg.llm.model, "tts": self.cfg.tts.model}[role]
        return resolve(role, spec)

    @property
    def stt(self) -> SpeechToText:
        with self._lock:
            if self._stt is None:
                from cloud.stt import SpeechToText

                self._stt = self._on_device("stt", SpeechToText(self.model("stt"), self.cfg.stt))
            return self._stt

    @property
    def chat(self) -> ChatBackend:
        with self._lock:
            if self._chat is None:
                from cloud.chat import load_chat

                self._chat = self._on_device("llm", load_chat(self.model("llm"), self.cfg.llm))
            return self._chat

    @property
    def tts(self) -> TextToSpeech:
        with self._lock:
            if self._tts is None:
                from cloud.tts import TextToSpeech

                self._tts = self._on_device("tts", TextToSpeech(self.model("tts"), self.cfg.tts))
            return self._tts

    def _on_device(self, role: str, runner: R) -> R:
        if self.device is not None and runner.device != self.device:
            raise EngineError(
                f"{role}: the model loaded on {runner.device}, but this runner must use {self.device} "
                "(no GPU visible to the process? check the container's GPU and its CUDA libraries)"
            )
        return runner

    def warm(self, roles: tuple[str, ...] = ("stt", "llm", "tts")) -> None:
        """Load the runners for ``roles`` now rather than on the first request."""
        for role in roles:
            getattr(self, {"llm": "chat"}.get(role, role))
