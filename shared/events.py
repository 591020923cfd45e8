"""Events the pipeline emits.

Every event is a frozen dataclass with a ``type`` and a monotonic timestamp ``t`` (seconds
since the pipeline started). Views (terminal, web, ``--json``) consume one stream of them.
Serialization is generic (:func:`to_dict`), never hand-written per class.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from shared.audio import Audio

@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"
    t: float


@dataclass(frozen=True)
class MeterTick(Event):
    """Levels of the last tick interval: the microphone as it came (``pre``), after the echo
    canceller took moi's voice out (``aec``, when one runs), after the VAD (``post``)."""

    type: ClassVar[str] = "meter"
    stage: Literal["pre", "aec", "post"]
    peak_db: float
    rms_db: float
    audio_t: float  # position in the input stream (s)


@dataclass(frozen=True)
class SpeechStarted(Event):
    type: ClassVar[str] = "speech_start"
    audio_t: float


@dataclass(frozen=True)
class SpeechEnded(Event):
    type: ClassVar[str] = "speech_end"
    audio_t: float
    start_t: float  # utterance start in the input stream (s), padding included
    seconds: float
    forced: bool = False  # True when the maximum utterance length flushed it
    decided_t: float = 0.0  # where in the input stream (s) the pause was judged over
    turn_p: float | None = None  # the turn-end model's P(finished), when it was asked
    waited: float = 0.0  # silence (s) from the last speech to that judgement: the turn decision's share of the latency


@dataclass(frozen=True)
class Dropped(Event):
    """Speech that reaches no transcript, and why: ``too short`` (a blip under the VAD's
    minimum), ``no words`` (Whisper found none in a sound over moi), ``moi's own voice``,
    ``said while moi spoke (half-duplex)``, ``the session ended``. With the transcripts, these
    account for every utterance the VAD cut (cloud.conversation)."""

    type: ClassVar[str] = "dropped"
    start_t: float  # where it lies in the input stream (s)
    end_t: float
    reason: str


@dataclass(frozen=True)
class StateChanged(Event):
    """The live conversation entered ``state`` (cloud.conversation: listening, speaking,
    deciding, answering, paused, stopping, closed), and why."""

    type: ClassVar[str] = "state"
    state: str
    why: str


@dataclass(frozen=True)
class TurnStarted(Event):
    """The conversation decided that the person's turn ended and starts answering it as turn
    ``turn``: what it answers lies at ``spans`` of the input stream (s); a typed message has
    none (cloud.conversation)."""

    type: ClassVar[str] = "turn"
    turn: int
    spans: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class ReplyWithdrawn(Event):
    """Turn ``turn``'s reply is withdrawn: the person went on before it was heard, or talked
    over its first sound. What it answered is answered again with what they say next, and
    nothing of it is remembered (cloud.conversation)."""

    type: ClassVar[str] = "withdrawn"
    turn: int


@dataclass(frozen=True)
class Transcript(Event):
    type: ClassVar[str] = "transcript"
    turn: int
    text: str
    language: str | None = None


@dataclass(frozen=True)
class ReplyToken(Event):
    type: ClassVar[str] = "reply_token"
    turn: int
    text: str


@dataclass(frozen=True)
class ReplyText(Event):
    """The whole reply once generation finished (or was cancelled)."""

    type: ClassVar[str] = "reply"
    turn: int
    text: str
    cancelled: bool = False


@dataclass(frozen=True)
class ReplyAudio(Event):
    type: ClassVar[str] = "reply_audio"
    turn: int
    text: str  # the sentence or clause this audio speaks
    audio: Audio


@dataclass(frozen=True)
class TurnDone(Event):
    """A turn's per-stage timings in seconds (keys: stt, llm_first_token, llm, tts_first,
    first_audio = end of speech → first reply audio, total)."""

    type: ClassVar[str] = "turn_done"
    turn: int
    engine: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplyStopped(Event):
    """Playback and generation cut off: ``reason`` is "barge-in" or "stop"; ``latency`` is
    the time from the trigger (speech onset seen / key pressed) to the speaker going quiet."""

    type: ClassVar[str] = "stopped"
    turn: int
    reason: str
    latency: float


@dataclass(frozen=True)
class ReplyPaused(Event):
    """The speaker paused the reply (``paused``) for something in the microphone that is not
    moi's voice, before the VAD could say whether it is a person, or went on with it (not
    ``paused``) when the VAD heard nobody (``--barge-in auto``: cloud.live)."""

    type: ClassVar[str] = "paused"
    turn: int
    paused: bool


@dataclass(frozen=True)
class Status(Event):
    """Periodic state for live views: VAD state, whether moi is speaking, lost input blocks."""

    type: ClassVar[str] = "status"
    listening: bool
    speaking: bool
    engine: str
    overflows: int = 0


@dataclass(frozen=True)
class FallbackUsed(Event):
    """The primary engine failed during this turn and the fallback answered (``remote → local``)."""

    type: ClassVar[str] = "fallback"
    turn: int
    engine: str
    reason: str


@dataclass(frozen=True)
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    message: str
    turn: int | None = None


def event_types() -> dict[str, type[Event]]:
    """Every event class by its ``type`` (subclasses of subclasses included)."""
    found: dict[str, type[Event]] = {}
    todo = list(Event.__subclasses__())
    while todo:
        cls = todo.pop()
        found[cls.type] = cls
        todo.extend(cls.__subclasses__())
    return found


def to_wire(event: Event) -> tuple[dict[str, Any], bytes]:
    """A JSON header and a binary payload (wyoming's shape, see :mod:`shared.wire`): audio goes
    as raw PCM16 in the payload, described in the header by its rate, never as base64. ``t`` is
    left out: each side stamps events with its own clock."""
    header: dict[str, Any] = {"type": event.type}
    payload = b""
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "t":
            continue
        if isinstance(value, Audio):
            header[f.name] = {"sample_rate": value.sample_rate, "format": "pcm16"}
            payload = value.to_pcm16()
        else:
            header[f.name] = value
    return header, payload


def from_wire(header: dict[str, Any], payload: bytes, t: float) -> Event:
    """The event :func:`to_wire` encoded, stamped ``t``; ValueError for a header that is not one."""
    cls = event_types().get(header.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown event type {header.get('type')!r}")
    kwargs: dict[str, Any] = {"t": t}
    for f in dataclasses.fields(cls):
        if f.name == "t" or f.name not in header:
            continue
        value = header[f.name]
        if isinstance(value, dict) and value.get("format") == "pcm16":
            value = Audio.from_pcm16(payload, int(value["sample_rate"]))
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad {cls.type} event: {exc}") from None


def to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict: ``type`` first, audio summarized (seconds, rate, peak), floats rounded."""
    out: dict[str, Any] = {"type": event.type}
    for f in dataclasses.fields(event):
        out[f.name] = _plain(getattr(event, f.name))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Audio):
        peak = float(np.max(np.abs(value.samples))) if len(value) else 0.0
        return {"seconds": round(value.seconds, 3), "sample_rate": value.sample_rate, "peak": round(peak, 4)}
    if isinstance(value, float):
        return None if math.isinf(value) or math.isnan(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
