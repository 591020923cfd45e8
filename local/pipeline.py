"""The pipeline: source → meter → VAD → meter → STT → LLM → TTS → sink, as one event stream.

Variants (the seed talk's build-up): ``transcribe`` stops at the transcript, ``echo`` has
Kokoro speak back what Whisper heard, ``chat`` answers through SmolLM2 in a running thread.
Every event carries ``t``, seconds on a monotonic clock since the run started.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from local.engine import Engine
from local.meter import LevelMeter
from local.vad import Segmenter, SpeechEnd, SpeechStart
from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import Config
from shared.errors import MoiError
from shared.events import (
    ErrorEvent,
    Event,
    FallbackUsed,
    MeterTick,
    ReplyAudio,
    ReplyText,
    ReplyToken,
    SpeechEnded,
    SpeechStarted,
    Transcript,
    TurnDone,
)
from shared.messages import ChatOptions, Thread
from shared.text import SentenceStream

VARIANTS = ("transcribe", "echo", "chat")


def file_source(path: str | Path, chunk_s: float = 0.1) -> Iterator[Audio]:
    """A file decoded to 16 kHz mono, in chunks (as a microphone would deliver it)."""
    audio = decode(path)
    step = max(1, int(chunk_s * SPEECH_RATE))
    for i in range(0, len(audio), step):
        yield Audio(audio.samples[i : i + step], SPEECH_RATE)


@dataclass
class Clock:
    start: float

    def __call__(self) -> float:
        return time.monotonic() - self.start


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
        self.turns = 0
        self.failures = 0

    def run(self, source: Iterable[Audio]) -> Iterator[Event]:
        """The whole pipeline in this thread: each utterance's turn runs as it ends."""
        clock = Clock(time.monotonic())
        for item in self.listen(source, clock):
            if isinstance(item, Audio):
                yield from self.turn(item, clock)
            else:
                yield item

    def listen(self, source: Iterable[Audio], clock: Clock | None = None) -> Iterator[Event | Audio]:
        """The front half: meters and VAD events, and each utterance (an Audio) as it ends."""
        clock = clock or Clock(time.monotonic())
        tick = SPEECH_RATE * self.cfg.tick_ms // 1000
        pre, post = LevelMeter(tick), LevelMeter(tick)
        self.segmenter.reset()
        for chunk in source:
            if chunk.sample_rate != SPEECH_RATE:
                chunk = chunk.resample(SPEECH_RATE)
            for end, level in pre.feed(chunk.samples):
                yield MeterTick(clock(), "pre", level.peak_db, level.rms_db, end / SPEECH_RATE)
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
            yield SpeechEnded(clock(), ev.at, ev.start, seconds, ev.forced)
            if ev.audio is not None:
                yield ev.audio

    def turn(self, utterance: Audio, clock: Clock | None = None) -> Iterator[Event]:
        """One utterance through STT (→ LLM) (→ TTS); errors end the turn, not the run."""
        clock = clock or Clock(time.monotonic())
        self.turns += 1
        n, t0 = self.turns, clock()
        timings: dict[str, float] = {}
        self.cancel.clear()
        if hasattr(self.engine, "begin_turn"):
            self.engine.begin_turn()
        try:
            transcription = self.engine.transcribe(utterance, language=self.cfg.stt.language)
            timings["stt"] = clock() - t0
            yield Transcript(clock(), n, transcription.text, transcription.language)
            if transcription.text and self.variant == "echo":
                yield ReplyText(clock(), n, transcription.text)
                yield from self._speak_all([transcription.text], n, t0, timings, clock)
            elif transcription.text and self.variant == "chat":
                yield from self._chat(transcription.text, n, t0, timings, clock)
            timings["total"] = clock() - t0
            yield from self._fallback_notice(n, clock)
            yield TurnDone(clock(), n, self.engine.name, timings)
        except MoiError as exc:
            self.failures += 1
            self.thread.drop_last_user()
            yield from self._fallback_notice(n, clock)
            yield ErrorEvent(clock(), str(exc), n)

    def _fallback_notice(self, n: int, clock: Clock) -> Iterator[Event]:
        reasons = getattr(self.engine, "reasons", None)
        if reasons:
            yield FallbackUsed(clock(), n, self.engine.name, reasons[0])

    def _chat(self, text: str, n: int, t0: float, timings: dict[str, float], clock: Clock) -> Iterator[Event]:
        llm = self.cfg.llm
        self.thread.add_user(text)
        options = ChatOptions(
            max_tokens=llm.max_tokens, temperature=llm.temperature, seed=llm.seed, repeat_penalty=llm.repeat_penalty
        )
        sentences = SentenceStream(self.cfg.tts.first_clause_chars, self.cfg.tts.first_words)
        reply: list[str] = []
        t_llm = clock()
        for token in self.engine.chat(self.thread.messages(), options=options, cancel=self.cancel):
            timings.setdefault("llm_first_token", clock() - t_llm)
            reply.append(token)
            yield ReplyToken(clock(), n, token)
            for piece in sentences.feed(token):
                yield from self._speak_all([piece], n, t0, timings, clock)
            if self.cancel.is_set():
                break
        timings["llm"] = clock() - t_llm - timings.get("tts", 0.0)
        text_out = "".join(reply).strip()
        if not self.cancel.is_set():
            yield from self._speak_all(sentences.flush(), n, t0, timings, clock)
        self.thread.add_assistant(text_out)
        yield ReplyText(clock(), n, text_out, cancelled=self.cancel.is_set())

    def _speak_all(
        self, pieces: list[str], n: int, t0: float, timings: dict[str, float], clock: Clock
    ) -> Iterator[Event]:
        for piece in pieces:
            t = clock()
            for audio in self.engine.speak(piece, voice=self.cfg.tts.voice, cancel=self.cancel):
                now = clock()
                timings.setdefault("tts_first", now - t)
                timings.setdefault("first_audio", now - t0)
                timings["tts"] = timings.get("tts", 0.0) + (now - t)
                yield ReplyAudio(now, n, piece, audio)
                t = clock()
            if self.cancel.is_set():
                return


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
