"""The pipeline: source → meter → (echo canceller → meter) → VAD → meter → utterance →
``engine.turn`` → events.

The listening half (meters before the echo canceller, after it and after the VAD, the Silero
segmenter cutting utterances) runs here; each utterance is handed to the engine's turn (:mod:`cloud.turn`, wherever the
engine runs) with the conversation so far, and the thread learns each exchange. Variants (the
seed talk's build-up): ``transcribe`` stops at the transcript, ``echo`` has Kokoro speak back
what Whisper heard, ``chat`` answers through SmolLM2. Every event carries ``t``, seconds on a
monotonic clock since the run started.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from cloud.streams import close_iterator
from cloud.turn_end import SmartTurn
from cloud.vad import Segmenter, SileroVad, SpeechEnd, SpeechPause, SpeechStart
from cloud.conversation import Heard, OverMoi, speech_ended
from cloud.meter import LevelMeter
from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import Config
from shared.engine import VARIANTS, Clock, Engine, Stopwatch, TurnRequest
from shared.errors import ModelNotFound, MoiError
from shared.events import ErrorEvent, Event, MeterTick, ReplyAudio, ReplyText, SpeechStarted, Transcript
from shared.messages import ChatOptions, Message, Thread
from shared.models import PACK_INSTALL, resolve

log = logging.getLogger("moi.pipeline")
# Over moi's voice the VAD hears a person 0.25-0.5 s after they begin (the canceller holds them
# down at first, measured live), so its 0.3 s of pre-roll lost first words ("Well, good luck with
# that." heard as "good luck with that."): an utterance that began while moi spoke reaches this
# much further back in what the linear filter cleaned.
OVER_MOI_PRE_ROLL_S = 0.3


def file_source(path: str | Path, chunk_s: float = 0.1) -> Iterator[Audio]:
    """A file decoded to 16 kHz mono, in chunks (as a microphone would deliver it)."""
    audio = decode(path)
    step = max(1, int(chunk_s * SPEECH_RATE))
    for i in range(0, len(audio), step):
        yield Audio(audio.samples[i : i + step], SPEECH_RATE)


def listening(cfg: Config, note: Callable[[str], None] | None = None) -> Segmenter:
    """The VAD with the end-of-turn model ``cfg.vad.turn_model`` names, loaded; ``auto``
    without Smart Turn installed (or ``off``) ends turns on silence alone, and ``note`` says so."""
    turn_end = None
    if cfg.vad.turn_model != "off":
        try:
            turn_end = SmartTurn(resolve("turn", cfg.vad.turn_model).path)
        except ModelNotFound:
            if cfg.vad.turn_model != "auto":
                raise
            if note is not None:
                note(f"no turn-end model (`{PACK_INSTALL['smart-turn-v3.2']}` adds Smart Turn): "
                     f"turns end after {cfg.vad.silence_ms} ms of silence")
    return Segmenter(SileroVad(resolve("vad", cfg.vad.model).path), cfg.vad, turn_end)


class Canceller(Protocol):
    """What the listening stage needs of an echo canceller (local.echo.EchoCanceller)."""

    converged: bool  # trusted: speech over moi can be acted on
    talk: TalkOver  # is a person talking over moi

    @property
    def playing(self) -> bool: ...  # moi's voice is in the microphone now

    def __call__(self, chunk: Audio, captured_at: float) -> Audio: ...

    def linear(self, start_s: float, n: int) -> np.ndarray | None: ...

    def played(self, start_s: float, end_s: float) -> bool: ...


class TalkOver(Protocol):
    def person(self) -> bool: ...

    def someone(self) -> bool: ...


class Listener:
    """The front half for one input: each chunk through the meters, the echo canceller (when
    the microphone hears moi's speaker) and the VAD, as one :class:`Heard`. Every utterance the
    VAD cuts comes out as Whisper should hear it (``_heard``)."""

    def __init__(self, segmenter: Segmenter, cfg: Config, echo: Canceller | None = None, clock: Clock | None = None,
                 meters: bool = True) -> None:
        self.segmenter = segmenter
        self.cfg = cfg
        self.echo = echo
        self.clock = clock or Stopwatch()
        self.meters = meters  # off: no MeterTick is measured (nobody draws them; ~15 % of a chunk's work)
        tick = SPEECH_RATE * cfg.tick_ms // 1000
        self._pre, self._aec, self._post = LevelMeter(tick), LevelMeter(tick), LevelMeter(tick)
        segmenter.reset()

    def feed(self, chunk: Audio, captured_at: float = 0.0, overflows: int = 0) -> Heard:
        """``captured_at``: the monotonic time of the chunk's first sample (the echo canceller's
        reference is cut there)."""
        if chunk.sample_rate != SPEECH_RATE:
            chunk = chunk.resample(SPEECH_RATE)
        t = self.clock()
        meters = self._measure(t, "pre", self._pre, chunk.samples)
        echo = self.echo
        if echo is not None:
            chunk = echo(chunk, captured_at)
            # over moi's voice the canceller holds a person down at first: listen closer
            self.segmenter.threshold = self.cfg.vad.over_reply_threshold if echo.playing else self.cfg.vad.threshold
            meters += self._measure(t, "aec", self._aec, chunk.samples)
        vad = self._cleaned(self.segmenter.feed(chunk))
        meters += self._measure(t, "post", self._post, self.segmenter.gated)
        return Heard(t, tuple(meters), vad, self.segmenter.speaking, self._over_moi(), overflows, self.segmenter.voiced)

    def _measure(self, t: float, stage: str, meter: LevelMeter, samples: np.ndarray) -> list[MeterTick]:
        if not self.meters:
            return []
        return [MeterTick(t, stage, lv.peak_db, lv.rms_db, end / SPEECH_RATE) for end, lv in meter.feed(samples)]

    def flush(self) -> Heard:
        """The end of the input: an utterance under way ends here."""
        return Heard(self.clock(), (), self._cleaned(self.segmenter.flush()), False, self._over_moi())

    def _over_moi(self) -> OverMoi | None:
        echo = self.echo
        if echo is None:
            return None
        # the person test reads the echo path's last 0.3 s: only asked while someone speaks over moi
        person = self.segmenter.speaking and echo.playing and echo.talk.person()
        return OverMoi(echo.converged, person, echo.talk.someone())

    def _cleaned(self, events: list) -> tuple:
        return tuple(replace(ev, audio=self._heard(ev.start, ev.audio))
                     if isinstance(ev, (SpeechPause, SpeechEnd)) and ev.audio is not None else ev for ev in events)

    def _heard(self, start: float, audio: Audio) -> Audio:
        """An utterance as Whisper should hear it: with an echo canceller, the microphone with
        moi's voice taken out by a linear filter (``EchoCanceller.linear``: the canceller's own
        output, which the VAD listens to, holds a person down while both talk), from
        OVER_MOI_PRE_ROLL_S earlier when moi was speaking as it began."""
        echo = self.echo
        if echo is None:
            return audio
        over_moi = echo.played(start, start + OVER_MOI_PRE_ROLL_S)
        before = int(OVER_MOI_PRE_ROLL_S * SPEECH_RATE) if over_moi and start >= OVER_MOI_PRE_ROLL_S else 0
        n = len(audio.samples)
        cleaned = echo.linear(start - before / SPEECH_RATE, n + before)
        if before and (cleaned is None or len(cleaned) < before):  # not held that far back
            before, cleaned = 0, echo.linear(start, n)
        if cleaned is None:
            return audio
        # the last few ms (the post-roll) may not be cleaned yet: the canceller's output there
        return Audio(np.concatenate([cleaned, audio.samples[len(cleaned) - before :]]), SPEECH_RATE)


class Pipeline:
    """The stages for one input: the segmenter that cuts utterances, the engine that answers
    each one, the conversation so far. Built once; ``run`` is a whole file, utterance after
    utterance; a live session drives ``answer``/``remember`` from its state machine."""

    def __init__(
        self,
        engine: Engine,
        segmenter: Segmenter,
        cfg: Config = Config(),
        variant: str = "chat",
        thread: Thread | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise MoiError(f"unknown pipeline {variant!r}: choose one of {', '.join(VARIANTS)}")
        self.engine = engine
        self.segmenter = segmenter
        self.cfg = cfg
        self.variant = variant
        self.thread = thread or Thread(cfg.llm.system_prompt, cfg.llm.max_turns)
        self.turns = 0  # turns run by ``run``
        # the user's and the reply's item ids of the turn answered: Realtime sets them on the machine's
        # thread as each turn starts
        self.ids: tuple[str, str] = ("", "")
        self.failures = 0  # answers that ended in an error

    @property
    def engine_name(self) -> str:
        return self.engine.name

    def run(self, source: Iterable[Audio], echo: Canceller | None = None, cancel: threading.Event | None = None,
            ) -> Iterator[Event]:
        """The whole pipeline in this thread: each utterance's turn runs as it ends. ``cancel``
        (Stop): set, it ends the reply in progress and every one after it."""
        clock = Stopwatch()
        for item in self.listen(source, clock, echo):
            if isinstance(item, Audio):
                yield from self.turn(item, clock, cancel)
            else:
                yield item

    def listen(self, source: Iterable[Audio], clock: Clock | None = None, echo: Canceller | None = None,
               ) -> Iterator[Event | Audio]:
        """The front half as a stream: meters and VAD events, and each utterance (an Audio) as
        it ends. With ``echo``, ``source`` is a microphone that says when each chunk was
        captured (``captured_at``, as :class:`local.audio_io.MicSource` does)."""
        listener = Listener(self.segmenter, self.cfg, echo, clock)
        heard = (listener.feed(chunk, getattr(source, "captured_at", 0.0)) for chunk in source)
        for h in itertools.chain(heard, [None]):
            h = h or listener.flush()
            yield from h.meters
            for ev in h.vad:
                if isinstance(ev, SpeechStart):
                    yield SpeechStarted(h.t, ev.at)
                elif isinstance(ev, SpeechEnd):
                    yield speech_ended(ev, h.t)
                    if ev.audio is not None:
                        yield ev.audio

    def turn(self, utterance: Audio, clock: Clock | None = None, cancel: threading.Event | None = None,
             ) -> Iterator[Event]:
        """The next turn of a file run (or a bench's): answered, and the exchange remembered."""
        self.turns += 1
        heard = ""
        for ev in self.answer(utterance, self.request(self.turns), cancel or threading.Event(), clock):
            if isinstance(ev, Transcript):
                heard = ev.text
            elif isinstance(ev, ReplyText):
                self.remember(heard, ev.text)
            yield ev

    def answer(self, utterance: Audio, request: TurnRequest, cancel: threading.Event, clock: Clock | None = None,
               ) -> Iterator[Event]:
        """One utterance through ``engine.turn``. Any failure, whatever raised it, ends this turn
        with an ``ErrorEvent``, never the run; ``cancel`` ends it at the next step."""
        clock = clock or Stopwatch()
        events = self.engine.turn(utterance, request, cancel=cancel, clock=clock)
        try:
            yield from events
        except Exception as exc:  # noqa: BLE001 - the stage boundary: report it, go on with the next turn
            self.failures += 1
            log.debug("turn %d failed", request.turn, exc_info=exc)  # the traceback, for whoever turns logging on
            yield ErrorEvent(clock(), _describe(exc), request.turn)
        finally:
            close_iterator(events)

    def remember(self, heard: str | None, reply: str, revising: Message | None = None) -> Message | None:
        """The conversation learns an exchange: what was heard and what was replied (chat, both
        said; of a stopped reply, the words that were heard), under ``ids``. ``heard`` None: the reply answers the
        thread's waiting typed message. ``revising``: the reply this call returned before, cut
        short: only ``reply`` of it was heard ("" forgets the exchange). Returns the reply's
        message, for a later revision."""
        if self.variant != "chat":
            return None
        if revising is not None:
            said = self.thread.revise(revising, reply, with_user=heard is not None)
        elif not reply:
            return None
        elif heard is None:
            said = self.thread.add_assistant(reply, self.ids[1]) if self.thread.waiting is not None else None
        elif heard:
            said = self.thread.add_exchange(heard, reply, self.ids)
        else:
            return None
        prepare = getattr(self.engine, "prepare", None)  # the in-process engine: a head start on the next prompt
        if prepare is not None:
            prepare(self._messages())  # (not request(): a subclass may hold its lock around this call)
        return said

    def has_words(self, audio: Audio) -> bool:
        """Whether Whisper finds words in ``audio`` (a barge-in's utterance)."""
        text = self.engine.transcribe(audio, language=self.cfg.stt.language).text
        return any(c.isalnum() for c in text)

    def request(self, n: int) -> TurnRequest:
        """Turn ``n``: the conversation so far and the reply options."""
        llm = self.cfg.llm
        return TurnRequest(
            messages=self._messages(),
            options=ChatOptions(
                max_tokens=llm.max_tokens, temperature=llm.temperature, seed=llm.seed,
                repeat_penalty=llm.repeat_penalty,
            ),
            variant=self.variant,
            voice=None if self.cfg.tts.voice == "auto" else self.cfg.tts.voice,
            language=self.cfg.stt.language,
            turn=n,
        )

    def _messages(self) -> tuple[Message, ...]:
        """The conversation so far, as much as fits the model's context."""
        return tuple(self.thread.messages(max_chars=self._thread_budget()))

    def _thread_budget(self) -> int:
        """Characters of conversation that fit the model's context with room for the reply and
        the longest utterance: ~3 characters a token, counted low on purpose."""
        llm = self.cfg.llm
        utterance = int(self.cfg.vad.max_utterance_s * 20)  # ~3.3 words a second, 6 characters a word
        return max(0, (llm.context - llm.max_tokens) * 3 - utterance)


def _describe(exc: BaseException) -> str:
    """One line for people: a MoiError's own message, else the exception's kind and text."""
    if isinstance(exc, MoiError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def reply_audio(events: Iterable[Event], gap_s: float = 0.3) -> Audio | None:
    """All reply audio of a run as one Audio (turns separated by ``gap_s`` of silence)."""
    parts: list[Audio] = []
    last_turn = None
    for ev in events:
        if isinstance(ev, ReplyAudio):
            if last_turn is not None and ev.turn != last_turn:
                parts.append(Audio.silence(gap_s, ev.audio.sample_rate))
            parts.append(ev.audio)
            last_turn = ev.turn
    if not parts:
        return None
    return Audio(np.concatenate([p.samples for p in parts]), parts[0].sample_rate)
