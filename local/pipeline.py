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
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from cloud.vad import Segmenter, SpeechEnd, SpeechStart
from local.meter import LevelMeter
from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import Config
from shared.engine import VARIANTS, Clock, Engine, Stopwatch, TurnRequest
from shared.errors import MoiError
from shared.events import ErrorEvent, Event, MeterTick, ReplyAudio, ReplyText, SpeechEnded, SpeechStarted, Transcript
from shared.messages import ChatOptions, Thread

log = logging.getLogger("moi.pipeline")


def file_source(path: str | Path, chunk_s: float = 0.1) -> Iterator[Audio]:
    """A file decoded to 16 kHz mono, in chunks (as a microphone would deliver it)."""
    audio = decode(path)
    step = max(1, int(chunk_s * SPEECH_RATE))
    for i in range(0, len(audio), step):
        yield Audio(audio.samples[i : i + step], SPEECH_RATE)


class Pipeline:
    """Runs one variant over a source; ``run`` yields events as they happen."""

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
                for end, level in aec.feed(chunk.samples):
                    yield MeterTick(clock(), "aec", level.peak_db, level.rms_db, end / SPEECH_RATE)
            vad_events = self.segmenter.feed(chunk)
            for end, level in post.feed(self.segmenter.gated):
                yield MeterTick(clock(), "post", level.peak_db, level.rms_db, end / SPEECH_RATE)
            yield from self._handle(vad_events, clock)
        yield from self._handle(self.segmenter.flush(), clock)

    def _handle(self, vad_events: list[SpeechStart | SpeechEnd], clock: Clock) -> Iterator[Event | Audio]:
        for ev in vad_events:
            if isinstance(ev, SpeechStart):
                yield SpeechStarted(clock(), ev.at)
                continue
            seconds = ev.audio.seconds if ev.audio is not None else ev.at - ev.start
            yield SpeechEnded(clock(), ev.at, ev.start, seconds, ev.forced, ev.decided, ev.turn_p)
            if ev.audio is not None:
                yield ev.audio

    def turn(self, utterance: Audio, clock: Clock | None = None) -> Iterator[Event]:
        """One utterance through ``engine.turn``; the thread learns the exchange. Any failure,
        whatever raised it, ends this turn with an ``ErrorEvent``, never the run."""
        clock = clock or Stopwatch()
        self.turns += 1
        n = self.turns
        self.cancel.clear()
        llm = self.cfg.llm
        request = TurnRequest(
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
        heard = ""
        events = self.engine.turn(utterance, request, cancel=self.cancel, clock=clock)
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
            close = getattr(events, "close", None)
            if close is not None:
                close()


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
