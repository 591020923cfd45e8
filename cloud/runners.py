"""The three model runners of one process, built on first use from one Config.

The HTTP gateway, the local engine and the Modal classes all hold a :class:`Runners`; each
runner loads once (thread-safe) and is shared by everyone in the process.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from shared.config import Config
from shared.models import ResolvedModel, resolve

if TYPE_CHECKING:
    from cloud.chat import ChatBackend
    from cloud.stt import SpeechToText
    from cloud.tts import TextToSpeech


class Runners:
    def __init__(self, cfg: Config = Config()) -> None:
        self.cfg = cfg
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

                self._stt = SpeechToText(self.model("stt"), self.cfg.stt)
            return self._stt

    @property
    def chat(self) -> ChatBackend:
        with self._lock:
            if self._chat is None:
                from cloud.chat import load_chat

                self._chat = load_chat(self.model("llm"), self.cfg.llm)
            return self._chat

    @property
    def tts(self) -> TextToSpeech:
        with self._lock:
            if self._tts is None:
                from cloud.tts import TextToSpeech

                self._tts = TextToSpeech(self.model("tts"), self.cfg.tts)
            return self._tts

    def warm(self, roles: tuple[str, ...] = ("stt", "llm", "tts")) -> None:
        """Load the runners for ``roles`` now rather than on the first request."""
        for role in roles:
            getattr(self, {"llm": "chat"}.get(role, role))
