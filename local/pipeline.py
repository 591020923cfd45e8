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

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from cloud.streams import close_iterator
from cloud.vad import Segmenter, SpeechEnd, SpeechPause, SpeechResume, SpeechStart
from local.meter import LevelMeter
from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import Config
from shared.engine import VARIANTS, Clock, Engine, Stopwatch, TurnRequest
from shared.errors import MoiError
from shared.events import ErrorEvent, Event, MeterTick, ReplyAudio, ReplyText, SpeechEnded, SpeechStarted, Transcript
from shared.messages import ChatOptions, Thread

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


class Speculation:
    """A turn started at a pause, before the turn is decided (``SpeechPause``): it runs in a
    thread of its own and its events wait here. Confirmed (the turn ended in that pause), they
    become the turn's, as if it had started then; dropped (the person went on), it is cancelled
    and nothing of it is shown, played or added to the conversation."""

    def __init__(
        self, engine: Engine, utterance: Audio, request: TurnRequest, start: float, clock: Clock,
        one_at_a_time: threading.Lock,
    ) -> None:
        self.start = start  # where the utterance starts in the stream: its SpeechEnd says the same
        self.cancel = threading.Event()
        self.dropped = False
        self.utterance: Audio | None = None  # confirmed: the utterance whose turn this is
        self._out: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, args=(engine, utterance, request, clock, one_at_a_time), name="moi-speculate",
            daemon=True,
        )
        self._thread.start()

    def _run(self, engine: Engine, utterance: Audio, request: TurnRequest, clock: Clock, lock: threading.Lock) -> None:
        events = None
        try:
            with lock:  # behind a dropped one that is still stopping (its Whisper pass cannot be cut)
                if self.dropped:
                    return
                events = engine.turn(utterance, request, cancel=self.cancel, clock=clock)
                for ev in events:
                    if self.dropped:
                        break
                    self._out.put(ev)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the turn
            self._out.put(exc)
        finally:
            close_iterator(events)
            self._out.put(_DONE)

    def events(self) -> Iterator[Event]:
        """The turn's events: those that waited, then the rest as they come. Closed early, the
        turn is cancelled, as closing an engine's turn does."""
        done = False
        try:
            while (item := self._out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
            done = True
        finally:
            if not done:
                self.cancel.set()

    def drop(self) -> None:
        self.dropped = True
        self.cancel.set()


_DONE = object()


class Pipeline:
    """Runs one variant over a source; ``run`` yields events as they happen.

    ``may_speculate``: set by a live session, says whether a turn may start at a pause, before
    the turn is decided (nothing else is answering); None (a file): turns start when decided.
    """

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
        self.cancel = threading.Event()  # Stop: ends the reply in progress
        # Takes moi's voice out of the microphone (local.echo.EchoCanceller), when it hears one
        self.echo: Callable[[Audio, float], Audio] | None = None
        self.turns = 0
        self.failures = 0
        self.may_speculate: Callable[[], bool] | None = None
        self._lock = threading.Lock()  # the listening thread starts and drops, the turn's adopts
        self._spec: Speculation | None = None  # the turn started at the current pause
        self._one_at_a_time = threading.Lock()  # the engine runs one turn at a time
        self.speculated = self.dropped = 0  # turns started at a pause; of those, dropped

    def run(self, source: Iterable[Audio]) -> Iterator[Event]:
        """The whole pipeline in this thread: each utterance's turn runs as it ends."""
        clock = Stopwatch()
        for item in self.listen(source, clock):
            if isinstance(item, Audio):
                yield from self.turn(item, clock)
            else:
                yield item

    def listen(self, source: Iterable[Audio], clock: Clock | None = None) -> Iterator[Event | Audio]:
        """The front half: meters and VAD events, and each utterance (an Audio) as it ends.
        With ``echo`` set, ``source`` is a microphone that says when each chunk was captured
        (``captured_at``, as :class:`local.audio_io.MicSource` does)."""
        clock = clock or Stopwatch()
        tick = SPEECH_RATE * self.cfg.tick_ms // 1000
        pre, aec, post = LevelMeter(tick), LevelMeter(tick), LevelMeter(tick)
        self.segmenter.reset()
        for chunk in source:
            if chunk.sample_rate != SPEECH_RATE:
                chunk = chunk.resample(SPEECH_RATE)
            for end, level in pre.feed(chunk.samples):
                yield MeterTick(clock(), "pre", level.peak_db, level.rms_db, end / SPEECH_RATE)
            if self.echo is not None:
                chunk = self.echo(chunk, source.captured_at)  # type: ignore[attr-defined]
                # over moi's voice the canceller holds a person down at first: listen closer
                over = getattr(self.echo, "playing", False)
                self.segmenter.threshold = self.cfg.vad.over_reply_threshold if over else self.cfg.vad.threshold
                for end, level in aec.feed(chunk.samples):
                    yield MeterTick(clock(), "aec", level.peak_db, level.rms_db, end / SPEECH_RATE)
            vad_events = self.segmenter.feed(chunk)
            for end, level in post.feed(self.segmenter.gated):
                yield MeterTick(clock(), "post", level.peak_db, level.rms_db, end / SPEECH_RATE)
            yield from self._handle(vad_events, clock)
        yield from self._handle(self.segmenter.flush(), clock)

    def _handle(self, vad_events: list[SpeechStart | SpeechPause | SpeechResume | SpeechEnd], clock: Clock,
                ) -> Iterator[Event | Audio]:
        for ev in vad_events:
            if isinstance(ev, SpeechStart):
                yield SpeechStarted(clock(), ev.at)
            elif isinstance(ev, SpeechPause):
                self._speculate(replace(ev, audio=self._heard(ev.start, ev.audio)), clock)
            elif isinstance(ev, SpeechResume):
                with self._lock:
                    self._drop()
            else:
                if ev.audio is not None:  # before the speculation takes it: turn() knows it by identity
                    ev = replace(ev, audio=self._heard(ev.start, ev.audio))
                with self._lock:
                    if self._spec is not None and self._spec.start == ev.start and ev.audio is not None and not ev.forced:
                        self._spec.utterance = ev.audio  # the turn ended in the pause it started at
                    else:
                        self._drop()
                seconds = ev.audio.seconds if ev.audio is not None else ev.at - ev.start
                yield SpeechEnded(clock(), ev.at, ev.start, seconds, ev.forced, ev.decided, ev.turn_p)
                if ev.audio is not None:
                    yield ev.audio

    def _heard(self, start: float, audio: Audio) -> Audio:
        """An utterance as Whisper should hear it: with an echo canceller, the microphone with
        moi's voice taken out by a linear filter (``EchoCanceller.linear``: the canceller's own
        output, which the VAD listens to, holds a person down while both talk), from
        OVER_MOI_PRE_ROLL_S earlier when moi was speaking as it began."""
        linear = getattr(self.echo, "linear", None)
        if linear is None:
            return audio
        played = getattr(self.echo, "played", None)
        over_moi = played is not None and played(start, start + OVER_MOI_PRE_ROLL_S)
        before = int(OVER_MOI_PRE_ROLL_S * SPEECH_RATE) if over_moi and start >= OVER_MOI_PRE_ROLL_S else 0
        n = len(audio.samples)
        cleaned = linear(start - before / SPEECH_RATE, n + before)
        if before and (cleaned is None or len(cleaned) < before):  # not held that far back
            before, cleaned = 0, linear(start, n)
        if cleaned is None:
            return audio
        # the last few ms (the post-roll) may not be cleaned yet: the canceller's output there
        return Audio(np.concatenate([cleaned, audio.samples[len(cleaned) - before :]]), SPEECH_RATE)

    def _speculate(self, pause: SpeechPause, clock: Clock) -> None:
        """Start the turn at this pause, if the session allows it (it waits for a dropped one
        that is still stopping: one turn at a time on the engine)."""
        if self.may_speculate is None or not self.may_speculate() or self.variant == "transcribe":
            return
        with self._lock:
            self._drop()
            self._spec = Speculation(self.engine, pause.audio, self._request(self.turns + 1), pause.start, clock,
                                     self._one_at_a_time)
            self.speculated += 1

    def drop_speculation(self) -> None:
        """Cancel a turn started at a pause (the session is ending)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        """Cancel the speculation under way (the lock held); it stops on its own."""
        if self._spec is not None:
            self._spec.drop()
            self._spec = None
            self.dropped += 1

    def turn(self, utterance: Audio, clock: Clock | None = None) -> Iterator[Event]:
        """One utterance through ``engine.turn``; the thread learns the exchange. Any failure,
        whatever raised it, ends this turn with an ``ErrorEvent``, never the run."""
        clock = clock or Stopwatch()
        with self._lock:
            if self._spec is not None and self._spec.utterance is not utterance:
                self._drop()  # not this utterance's
            spec, self._spec = self._spec, None
        self.turns += 1
        n = self.turns
        heard = ""
        if spec is not None:  # started at the pause: it has a head start
            self.cancel = spec.cancel  # Stop reaches it as any turn
            events: Iterator[Event] = spec.events()
        else:
            self.cancel.clear()
            events = self._alone(utterance, self._request(n), clock)
        try:
            for ev in events:
                if isinstance(ev, Transcript):
                    heard = ev.text
                elif isinstance(ev, ReplyText) and heard and self.variant == "chat" and ev.text:
                    self.thread.add_exchange(heard, ev.text)
                yield ev
        except Exception as exc:  # noqa: BLE001 - the stage boundary: report it, go on with the next turn
            self.failures += 1
            log.debug("turn %d failed", n, exc_info=exc)  # the traceback, for whoever turns logging on
            yield ErrorEvent(clock(), _describe(exc), n)
        finally:
            close_iterator(events)

    def _alone(self, utterance: Audio, request: TurnRequest, clock: Clock) -> Iterator[Event]:
        """``engine.turn``, once a turn started at a pause and dropped has stopped."""
        with self._one_at_a_time:
            events = self.engine.turn(utterance, request, cancel=self.cancel, clock=clock)
            try:
                yield from events
            finally:
                close_iterator(events)

    def _request(self, n: int) -> TurnRequest:
        """Turn ``n``: the conversation so far and the reply options."""
        llm = self.cfg.llm
        return TurnRequest(
            messages=tuple(self.thread.messages(max_chars=self._thread_budget())),
            options=ChatOptions(
                max_tokens=llm.max_tokens, temperature=llm.temperature, seed=llm.seed,
                repeat_penalty=llm.repeat_penalty,
            ),
            variant=self.variant,
            voice=None if self.cfg.tts.voice == "auto" else self.cfg.tts.voice,
            language=self.cfg.stt.language,
            turn=n,
        )

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
