"""Voice activity: Silero VAD (ONNX, onnxruntime) and a segmenter that cuts utterances.

:class:`SileroVad` runs the model on 512-sample windows at 16 kHz, carrying the recurrent
state and 64 samples of context between windows. :class:`Segmenter` is the state machine:
speech starts at ``threshold`` and ends only after ``silence_ms`` below the lower ``release``
threshold (hysteresis); blips shorter than ``min_speech_ms`` are dropped; ``pre_roll_ms`` /
``post_roll_ms`` of audio are kept around each utterance so no word's start or end is
clipped; speech longer than ``max_utterance_s`` is flushed in pieces. With a turn-end model
(:mod:`cloud.turn_end`), a pause of ``turn_silence_ms`` asks it whether the person has finished:
a confident yes ends the utterance there; a no asks again at ``silence_ms`` and, still no, waits
up to ``turn_max_silence_ms``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.audio import SPEECH_RATE, Audio
from shared.config import VadConfig
from shared.errors import AudioError, ConfigError

WINDOW = 512  # samples per model call at 16 kHz (32 ms), fixed by the model
CONTEXT = 64  # samples of the previous window the model sees again


class SileroVad:
    """Speech probability per 512-sample window, with the model's state carried along."""

    def __init__(self, model_path: str | Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._sr = np.array(SPEECH_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        """``frame``: float32 [1, CONTEXT + WINDOW] (context then the new window)."""
        out, self._state = self.session.run(None, {"input": frame, "state": self._state, "sr": self._sr})
        return float(out[0, 0])


@dataclass(frozen=True)
class SpeechStart:
    at: float  # stream time (s) of the first speech window


@dataclass(frozen=True)
class SpeechPause:
    """The speaker has been silent ``speculate_ms``: the utterance so far, should the turn end
    in this pause (it may not: a :class:`SpeechResume` or the :class:`SpeechEnd` follows)."""

    at: float  # stream time (s) of the pause's start (the end of the last speech window)
    start: float  # stream time (s) where the utterance audio starts (as its SpeechEnd will say)
    audio: Audio


@dataclass(frozen=True)
class SpeechResume:
    """Speech again after a :class:`SpeechPause`: the utterance goes on."""

    at: float


@dataclass(frozen=True)
class SpeechEnd:
    at: float  # stream time (s) where the utterance audio ends (post-roll included)
    start: float  # stream time (s) where the utterance audio starts (pre-roll included)
    audio: Audio | None  # None when the speech was a blip shorter than min_speech_ms
    forced: bool = False  # flushed at max_utterance_s while speech went on
    decided: float = 0.0  # stream time (s) when the utterance was ended (the pause waited out)
    turn_p: float | None = None  # the turn-end model's last P(finished), when it was asked
    voice_end: float = 0.0  # stream time (s) of the last window heard as speech

    @property
    def dropped(self) -> bool:
        return self.audio is None


class Segmenter:
    """Feed 16 kHz audio in chunks of any size; get SpeechStart / SpeechEnd events back.

    After each ``feed``, ``gated`` holds the audio processed in that call with everything
    outside speech zeroed (what a meter "after VAD" shows). ``turn_end``: P(the person has
    finished) of the utterance so far (:class:`cloud.turn_end.SmartTurn`), or None to end
    utterances on silence alone; ``turn_p`` is its last answer.
    """

    def __init__(
        self, vad: SileroVad, cfg: VadConfig = VadConfig(), turn_end: Callable[[np.ndarray], float] | None = None
    ) -> None:
        starts = (cfg.threshold, cfg.over_reply_threshold)
        if not (0.0 < cfg.release <= min(starts) and max(starts) < 1.0):
            raise ConfigError(
                f"VAD needs 0 < release ({cfg.release}) <= threshold ({cfg.threshold}) and over_reply_threshold "
                f"({cfg.over_reply_threshold}) < 1"
            )
        if cfg.max_utterance_s * 1000 <= cfg.min_speech_ms:
            raise ConfigError("VAD max_utterance_s must be longer than min_speech_ms")
        if cfg.speculate_ms < 0:
            raise ConfigError(f"VAD speculate_ms ({cfg.speculate_ms}) must be 0 (off) or more")
        if not 0.0 < cfg.turn_threshold <= 1.0 or cfg.turn_silence_ms <= 0:
            raise ConfigError(
                f"VAD turn_threshold ({cfg.turn_threshold}) must be in (0, 1] and turn_silence_ms "
                f"({cfg.turn_silence_ms}) above 0"
            )
        self.vad = vad
        self.cfg = cfg
        self.threshold = cfg.threshold  # where speech starts: the listener may lower it (over_reply_threshold)
        ms = SPEECH_RATE // 1000
        self._min_speech = cfg.min_speech_ms * ms
        self._silence = cfg.silence_ms * ms
        self._pre = cfg.pre_roll_ms * ms
        self._post = cfg.post_roll_ms * ms
        self._max = int(cfg.max_utterance_s * SPEECH_RATE)
        self.turn_end = turn_end
        # The model is asked twice a pause: early (a finished turn ends there), and again when
        # silence alone would have ended it (a no waits on, up to the longest pause).
        self._asks = sorted({cfg.turn_silence_ms * ms, cfg.silence_ms * ms})
        self._wait_max = max(cfg.turn_max_silence_ms, cfg.silence_ms) * ms
        # a pause this long is announced (SpeechPause) once, unless the turn has ended by then
        self._speculate = cfg.speculate_ms * ms if cfg.speculate_ms else None
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        # _store[:_len] holds stream samples from _buf_start on, preceded by CONTEXT samples
        # of context, so each model input is one contiguous slice (no copy per window). It
        # grows by doubling, so appending a chunk costs the chunk, not the utterance so far.
        self._store = np.zeros(max(CONTEXT * 2, 1 << 16), np.float32)
        self._len = CONTEXT
        self._buf_start = 0  # stream index of _store[CONTEXT]
        self._next = 0  # stream index of the next window to run
        self._speaking = False
        self._start = 0  # first speech sample of the current utterance
        self._cut = 0  # where the current utterance's audio begins (pre-roll or flush point)
        self._last_speech = 0  # end of the last window at or above release
        self._asked = 0  # how often the turn-end model has judged the current pause
        self._paused = False  # this pause was announced (SpeechPause)
        self.turn_p: float | None = None
        self.gated = np.zeros(0, np.float32)
        self.probs: list[float] = []  # probabilities of the windows run in the last feed
        self.voiced = False  # the last feed held a window of the utterance's voice (at or above release)

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def position(self) -> float:
        return self._next / SPEECH_RATE

    def feed(self, chunk: Audio | np.ndarray) -> list[SpeechStart | SpeechPause | SpeechResume | SpeechEnd]:
        if isinstance(chunk, Audio):
            if chunk.sample_rate != SPEECH_RATE:
                raise AudioError(f"the VAD takes {SPEECH_RATE} Hz audio, got {chunk.sample_rate} Hz: resample first")
            chunk = chunk.samples
        self._append(chunk)
        events: list[SpeechStart | SpeechPause | SpeechResume | SpeechEnd] = []
        buf, base = self._store[: self._len], self._buf_start - CONTEXT  # stream index of buf[0]
        n_windows = (self._buf_start + len(buf) - CONTEXT - self._next) // WINDOW
        gate = np.zeros(n_windows, dtype=bool)
        probs = np.empty(n_windows, dtype=np.float32)
        threshold, release, vad = self.threshold, self.cfg.release, self.vad
        voiced = False
        for i in range(n_windows):
            s = self._next
            lo = s - CONTEXT - base
            p = vad(buf[lo : lo + CONTEXT + WINDOW].reshape(1, -1))
            probs[i] = p
            end = s + WINDOW
            if not self._speaking:
                if p >= threshold:
                    self._speaking = True
                    self._start = s
                    self._cut = max(0, s - self._pre, self._cut)
                    self._last_speech, self._asked = end, 0
                    voiced = True
                    events.append(SpeechStart(s / SPEECH_RATE))
            else:
                if p >= release:
                    self._last_speech, self._asked = end, 0
                    voiced = True
                    if self._paused:
                        self._paused = False
                        events.append(SpeechResume(s / SPEECH_RATE))
                if self._turn_over(end, base):
                    events.append(self._finish(self._last_speech + self._post, end))
                elif (self._speculate is not None and not self._paused and end - self._last_speech >= self._speculate
                      and self._last_speech - self._start >= self._min_speech):
                    self._paused = True
                    audio_end = min(self._last_speech + self._post, end)
                    samples = self._store[self._cut - base : audio_end - base].copy()
                    events.append(SpeechPause(self._last_speech / SPEECH_RATE, self._cut / SPEECH_RATE,
                                              Audio(samples, SPEECH_RATE)))
                elif end - self._cut >= self._max:
                    events.append(self._finish(end, end, forced=True))
                    if p >= release:  # speech goes on: continue seamlessly from here
                        self._speaking, self._start, self._cut = True, end, end
                        events.append(SpeechStart(end / SPEECH_RATE))
            gate[i] = self._speaking
            self._next = end
        self.probs, self.voiced = probs.tolist(), voiced
        start_of_call = self._next - n_windows * WINDOW
        lo = start_of_call - base
        self.gated = (buf[lo : lo + n_windows * WINDOW].reshape(n_windows, WINDOW) * gate[:, None]).reshape(-1)
        self._trim()
        return events

    def _turn_over(self, end: int, base: int) -> bool:
        """Has the pause before ``end`` (a stream index) ended the utterance?"""
        pause = end - self._last_speech
        if self.turn_end is None:
            return pause >= self._silence
        if pause >= self._wait_max:
            return True
        if self._asked >= len(self._asks) or pause < self._asks[self._asked]:
            return False
        self._asked += 1
        self.turn_p = self.turn_end(self._store[self._cut - base : end - base])
        return self.turn_p >= self.cfg.turn_threshold

    def flush(self) -> list[SpeechEnd]:
        """End of stream: close an utterance in progress."""
        if not self._speaking:
            return []
        stream_end = self._buf_start + self._len - CONTEXT
        return [self._finish(min(self._last_speech + self._post, stream_end), stream_end)]

    def _finish(self, audio_end: int, now: int, forced: bool = False) -> SpeechEnd:
        self._speaking = self._paused = False
        cut = self._cut
        audio_end = min(audio_end, now)
        speech = self._last_speech - self._start
        self._cut = audio_end
        turn_p, self.turn_p = self.turn_p, None
        if speech < self._min_speech and not forced:
            return SpeechEnd(audio_end / SPEECH_RATE, cut / SPEECH_RATE, None, decided=now / SPEECH_RATE,
                             voice_end=self._last_speech / SPEECH_RATE)
        base = self._buf_start - CONTEXT
        samples = self._store[cut - base : audio_end - base].copy()
        return SpeechEnd(
            audio_end / SPEECH_RATE, cut / SPEECH_RATE, Audio(samples, SPEECH_RATE), forced, now / SPEECH_RATE, turn_p,
            self._last_speech / SPEECH_RATE,
        )

    def _trim(self) -> None:
        """Drop audio no utterance can still need (keeps the pre-roll and the context)."""
        keep_from = self._cut if self._speaking else max(self._cut, self._next - self._pre)
        keep_from = min(keep_from, self._next)
        drop = keep_from - self._buf_start
        if drop > 0:  # shifts only what is kept: the pre-roll between utterances
            self._store[: self._len - drop] = self._store[drop : self._len]
            self._len -= drop
            self._buf_start = keep_from

    def _append(self, chunk: np.ndarray) -> None:
        need = self._len + len(chunk)
        if need > len(self._store):
            grown = np.zeros(max(need, 2 * len(self._store)), np.float32)
            grown[: self._len] = self._store[: self._len]
            self._store = grown
        self._store[self._len : need] = chunk
        self._len = need
