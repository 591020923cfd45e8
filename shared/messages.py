"""What the engines exchange: conversation messages, chat options, transcription results."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class ChatOptions:
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    repeat_penalty: float = 1.2  # SmolLM2-135M loops at temperature 0 without it
    stop: tuple[str, ...] = ()


class Thread:
    """A running conversation: a system prompt plus the last ``max_turns`` exchanges.

    The client owns the thread (servers are stateless); older exchanges fall off the front
    so the prompt stays bounded.
    """

    def __init__(self, system_prompt: str = "", max_turns: int = 6) -> None:
        if max_turns < 1:
            raise ValueError("a thread keeps at least one turn")
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self._turns: list[tuple[Message, Message | None]] = []

    def add_user(self, text: str) -> None:
        self._turns.append((Message("user", text), None))
        del self._turns[: max(0, len(self._turns) - self.max_turns)]

    def add_assistant(self, text: str) -> None:
        if not self._turns or self._turns[-1][1] is not None:
            raise ValueError("an assistant reply needs a user message before it")
        self._turns[-1] = (self._turns[-1][0], Message("assistant", text))

    def add_exchange(self, user: str, assistant: str) -> None:
        """One whole turn: what was heard and what was answered (even if cut short)."""
        self.add_user(user)
        self.add_assistant(assistant)

    def drop_last_user(self) -> None:
        """Forget an unanswered user message (its turn failed or was cancelled early)."""
        if self._turns and self._turns[-1][1] is None:
            self._turns.pop()

    def messages(self, max_chars: int | None = None) -> list[Message]:
        """System prompt, then the exchanges; with ``max_chars``, the oldest exchanges are left
        out until all of it fits (the system prompt and the newest exchange always stay)."""
        turns = list(self._turns)
        if max_chars is not None:
            size = len(self.system_prompt) + sum(len(u.content) + len(r.content if r else "") for u, r in turns)
            while len(turns) > 1 and size > max_chars:
                user, reply = turns.pop(0)
                size -= len(user.content) + len(reply.content if reply else "")
        out = [Message("system", self.system_prompt)] if self.system_prompt else []
        for user, reply in turns:
            out.append(user)
            if reply is not None:
                out.append(reply)
        return out

    def __len__(self) -> int:
        return len(self._turns)

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages())


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcription:
    text: str
    segments: tuple[Segment, ...] = ()
    language: str | None = None
    duration: float = 0.0
    dropped: int = 0  # segments rejected as likely hallucinations (silence, noise, loops)

    @classmethod
    def empty(cls, duration: float = 0.0, language: str | None = None) -> Transcription:
        return cls("", (), language, duration)


def as_messages(thread: Sequence[Message] | Thread) -> list[Message]:
    return thread.messages() if isinstance(thread, Thread) else list(thread)


__all__ = ["ChatOptions", "Message", "Role", "Segment", "Thread", "Transcription", "Word", "as_messages"]
