"""What the engines exchange: conversation messages, chat options, transcription results."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    id: str = field(default="", compare=False)  # a Realtime client's item id; "" elsewhere


@dataclass(frozen=True)
class ChatOptions:
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    repeat_penalty: float = 1.2  # SmolLM2-135M loops at temperature 0 without it
    stop: tuple[str, ...] = ()


class Thread:
    """A running conversation: a system prompt plus the messages of the last ``max_turns``
    turns (a turn: a user message and what follows it).

    The client owns the thread (servers are stateless); older turns fall off the front so the
    prompt stays bounded. Messages may carry ids (a Realtime connection's items), by which they
    can be deleted.
    """

    def __init__(self, system_prompt: str = "", max_turns: int = 6) -> None:
        if max_turns < 1:
            raise ValueError("a thread keeps at least one turn")
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self._messages: list[Message] = []

    def add_user(self, text: str, id: str = "") -> None:
        self._messages.append(Message("user", text, id))
        starts = [i for i, m in enumerate(self._messages) if m.role == "user"]
        if len(starts) > self.max_turns:
            del self._messages[: starts[-self.max_turns]]

    def add_assistant(self, text: str, id: str = "") -> Message:
        if not self._messages or self._messages[-1].role != "user":
            raise ValueError("an assistant reply needs a user message before it")
        self._messages.append(Message("assistant", text, id))
        return self._messages[-1]

    def add_exchange(self, user: str, assistant: str, ids: tuple[str, str] = ("", "")) -> Message:
        """One whole turn: what was heard and what was answered (even if cut short); returns the
        answer's message (for :meth:`revise`)."""
        self.add_user(user, ids[0])
        return self.add_assistant(assistant, ids[1])

    def revise(self, reply: Message, text: str, with_user: bool) -> Message | None:
        """A reply cut short after it was added: only ``text`` of it was heard. It keeps its place
        and id; "" forgets it, and, ``with_user``, the user message it answered too (a spoken
        turn: the exchange is forgotten as if never made). Returns the message now in its place."""
        for i in range(len(self._messages) - 1, -1, -1):
            if self._messages[i] is reply:
                break
        else:
            return None  # it fell off the front, or a Realtime client deleted it
        if text:
            self._messages[i] = Message("assistant", text, reply.id)
            return self._messages[i]
        del self._messages[i]
        if with_user and i > 0 and self._messages[i - 1].role == "user":
            del self._messages[i - 1]
        return None

    def drop_last_user(self) -> None:
        """Forget an unanswered user message (its turn failed or was cancelled early)."""
        if self._messages and self._messages[-1].role == "user":
            self._messages.pop()

    def delete(self, id: str) -> bool:
        """Forget the message with this id; False if there is none."""
        for i, m in enumerate(self._messages):
            if id and m.id == id:
                del self._messages[i]
                return True
        return False

    @property
    def waiting(self) -> Message | None:
        """The last message when it is the user's, not answered yet."""
        return self._messages[-1] if self._messages and self._messages[-1].role == "user" else None

    def messages(self, max_chars: int | None = None) -> list[Message]:
        """System prompt, then the turns; with ``max_chars``, the oldest turns are left out until
        all of it fits (the system prompt and the newest turn always stay)."""
        kept = list(self._messages)
        if max_chars is not None:
            size = len(self.system_prompt) + sum(len(m.content) for m in kept)
            while size > max_chars:
                starts = [i for i, m in enumerate(kept) if m.role == "user" and i > 0]
                if not starts:
                    break
                size -= sum(len(m.content) for m in kept[: starts[0]])
                del kept[: starts[0]]
        return ([Message("system", self.system_prompt)] if self.system_prompt else []) + kept

    def __len__(self) -> int:
        """Turns held."""
        return sum(m.role == "user" for m in self._messages)

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
