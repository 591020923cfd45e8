"""Speech to text on faster-whisper (CTranslate2): int8 on CPU, float16 on CUDA.

Whisper invents text for silence and noise ("Thank you.", loops). This runner returns
nothing rather than junk: audio below an RMS floor never reaches the model, and segments
are dropped on Whisper's own signals (no-speech probability with low log-probability,
very low log-probability, high compression ratio = repetition).

Whisper pads every utterance to a 30 s window, and its encoder's cost follows the window. A live
utterance is encoded on a window of its length plus a margin (SttConfig.window_s); the decoder,
trained on 30 s windows, now and then loops or hears nothing on a short one, and such a result
is redone on the full window. A file's batches (``transcribe_windows``) keep 30 s.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from shared.audio import SPEECH_RATE, Audio
from shared.config import SttConfig, cpu_cores, model_threads, single_thread_blas
from shared.messages import Segment, Transcription, Word
from shared.models import ResolvedModel
from shared.text import spoken_words


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except (ImportError, RuntimeError):
        return "cpu"


def rms_db(samples: np.ndarray) -> float:
    if len(samples) == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return max(-120.0, 20.0 * np.log10(rms)) if rms > 0 else -120.0


class _Encoder:
    """faster-whisper's ``WhisperModel.encode``, changed in two ways.

    - The features are cut to the window the calling thread asked for (:meth:`window`): the
      encoder's cost follows its input, and Whisper pads every utterance to 30 s. faster-whisper
      runs the encoder in the thread that reads its segments, so a thread-local is the request.
    - With ``threads``, the encoder runs on a CTranslate2 instance of its own with that many
      threads, for the decoder keeps half the cores: on 2 cores the encoder of a 30 s window
      takes 204 ms on two threads against 335 ms on one (with another program busy on one core
      362 against 358), while the beam search's small steps are slower on two (237 against 81
      ms for a 3 s utterance).
    """

    def __init__(self, encode: Callable, path: object, compute_type: str, threads: int) -> None:
        self.encode = encode  # faster-whisper's own
        self.model = None
        if threads:
            import ctranslate2

            self.model = ctranslate2.models.Whisper(str(path), device="cpu", compute_type=compute_type, intra_threads=threads)
        self._local = threading.local()

    @contextmanager
    def window(self, frames: int | None) -> Iterator[None]:
        """This thread's encoder calls read at most ``frames`` feature frames (None: all 3000)."""
        self._local.frames = frames
        try:
            yield
        finally:
            self._local.frames = None

    def __call__(self, features: np.ndarray):  # noqa: ANN204 - a ctranslate2.StorageView
        from faster_whisper.transcribe import get_ctranslate2_storage

        frames = getattr(self._local, "frames", None)
        if frames is not None and frames < features.shape[-1]:
            features = np.ascontiguousarray(features[..., :frames])
        if self.model is None:
            return self.encode(features)
        if features.ndim == 2:
            features = np.expand_dims(features, 0)
        return self.model.encode(get_ctranslate2_storage(features))


def repeats(text: str) -> bool:
    """Whisper looping: a word or phrase said three times in a row, or a phrase of four words or
    more twice ("who's going to implement it? Who's going to implement it?")."""
    words = spoken_words(text)
    for n in range(1, len(words) // 2 + 1):
        times = 2 if n >= 4 else 3
        for i in range(len(words) - times * n + 1):
            if all(words[i + k * n : i + (k + 1) * n] == words[i : i + n] for k in range(1, times)):
                return True
    return False


class SpeechToText:
    """One loaded Whisper model (CTranslate2 is safe to call from several threads)."""

    def __init__(self, model: ResolvedModel, cfg: SttConfig = SttConfig()) -> None:
        from faster_whisper import WhisperModel

        self.cfg = cfg
        self.model_info = model
        self.device = pick_device(cfg.device)
        compute = cfg.compute_type
        if compute == "auto":
            compute = "float16" if self.device == "cuda" else "int8"
        self.compute_type = compute
        single_thread_blas()  # its features' product would leave a spinning thread beside the encoder
        threads = model_threads(cfg.cpu_threads) if self.device == "cpu" else cfg.cpu_threads
        self.model = WhisperModel(str(model.path), device=self.device, compute_type=compute, cpu_threads=threads)
        own = self.device == "cpu" and cfg.cpu_threads == 0 and cpu_cores() > threads
        self._encoder = _Encoder(self.model.encode, model.path, compute, cpu_cores() if own else 0)
        self.model.encode = self._encoder
        self.multilingual = bool(self.model.model.is_multilingual)
        self.full_window_retries = 0  # windowed results redone on 30 s (looping, or no words)

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None = None,
        prompt: str | None = None,
        word_timestamps: bool | None = None,
    ) -> Transcription:
        cfg = self.cfg
        audio = audio.resample(SPEECH_RATE)
        language = self._language(language or cfg.language)
        if len(audio) < SPEECH_RATE // 10 or rms_db(audio.samples) < cfg.min_rms_db:
            return Transcription.empty(audio.seconds, language)
        words = cfg.word_timestamps if word_timestamps is None else word_timestamps
        frames = self.window_frames(audio.seconds)
        result = self._transcribe(audio, language, prompt, words, frames)
        if frames is not None and (not result.text or repeats(result.text)):
            self.full_window_retries += 1
            result = self._transcribe(audio, language, prompt, words, None)
        return result

    def window_frames(self, seconds: float) -> int | None:
        """The encoder's window for an utterance of ``seconds`` in feature frames (10 ms),
        even for the encoder's stride of 2; None: Whisper's full 30 s."""
        cfg = self.cfg
        if not cfg.window_s:
            return None
        frames = math.ceil(max(cfg.window_s, seconds + cfg.window_margin_s) * 100 / 2) * 2
        return frames if frames < self.model.feature_extractor.nb_max_frames else None

    def _transcribe(
        self, audio: Audio, language: str | None, prompt: str | None, words: bool, frames: int | None
    ) -> Transcription:
        cfg = self.cfg
        with self._encoder.window(frames):
            segments, info = self.model.transcribe(
                audio.samples,
                language=language if self.multilingual else None,
                beam_size=cfg.beam_size,
                initial_prompt=prompt or cfg.initial_prompt,
                word_timestamps=words,
                condition_on_previous_text=False,
                no_speech_threshold=cfg.no_speech_threshold,
                log_prob_threshold=cfg.logprob_threshold,
                compression_ratio_threshold=cfg.compression_ratio_threshold,
                vad_filter=False,  # our own Silero segmenter runs before this
            )
            kept, dropped = self._keep(segments, [(0.0, audio.seconds)])
        text = " ".join(seg.text for seg in kept if seg.text).strip()
        return Transcription(text, tuple(kept), info.language, audio.seconds, dropped)

    def transcribe_windows(
        self,
        audio: Audio,
        windows: Sequence[tuple[float, float]],
        *,
        language: str | None = None,
        prompt: str | None = None,
        word_timestamps: bool = False,
        batch_size: int = 8,
    ) -> Transcription:
        """Several spans of one long recording (each ≤ 30 s, e.g. the VAD's speech windows) in
        batches through faster-whisper's ``BatchedInferencePipeline``: the encoder and the beam
        search run ``batch_size`` windows at a time (bench/batch.py). Times are on ``audio``'s
        clock; quiet windows never reach Whisper, and the same junk rules drop what it invents.

        Each window is decoded as text only, without Whisper's timestamp tokens: with them the
        batched decoder (which has no temperature fallback) lost whole windows of the 8 kHz
        lecture (WER 0.12 against 0.03). With ``word_timestamps`` the cues are then cut from
        the aligned words (:func:`cues_from_words`); without, each window is one segment.
        """
        from faster_whisper import BatchedInferencePipeline

        audio = audio.resample(SPEECH_RATE)
        language = self._language(language or self.cfg.language) or ("en" if not self.multilingual else None)
        loud = [(a, b) for a, b in windows if b - a >= 0.1 and rms_db(audio.slice(a, b).samples) >= self.cfg.min_rms_db]
        if not loud:
            return Transcription.empty(audio.seconds, language)
        # One pipeline per call: it is a thin wrapper with state of its own (word timing), and
        # several threads may transcribe at once (Modal's Transcriber runs 4).
        segments, info = BatchedInferencePipeline(self.model).transcribe(
            audio.samples,
            language=language,
            beam_size=self.cfg.beam_size,
            initial_prompt=prompt or self.cfg.initial_prompt,
            word_timestamps=word_timestamps,
            without_timestamps=True,
            clip_timestamps=[{"start": a, "end": b} for a, b in loud],
            batch_size=batch_size,
        )
        kept, dropped = self._keep(segments, loud)
        if word_timestamps:
            kept = [cue for seg in kept for cue in cues_from_words(seg)]
        text = " ".join(seg.text for seg in kept if seg.text).strip()
        return Transcription(text, tuple(kept), info.language, audio.seconds, dropped)

    def _language(self, language: str | None) -> str | None:
        if language and not self.multilingual and language != "en":
            return "en"  # an English-only model: transcribe as English rather than fail
        return language

    def _keep(self, segments: Iterable, windows: Sequence[tuple[float, float]]) -> tuple[list[Segment], int]:
        """Whisper's segments as ours, less the junk; each judged against the end of the window
        that holds its middle (``windows`` sorted, on the same clock as the segments; a start
        may be a few ms before its window's, as Whisper rounds it)."""
        starts = [a for a, _ in windows]
        kept: list[Segment] = []
        dropped = 0
        for s in segments:
            end = windows[max(0, bisect.bisect_right(starts, (s.start + s.end) / 2) - 1)][1]
            if self._is_junk(s, end):
                dropped += 1
                continue
            kept.append(
                Segment(
                    start=round(s.start, 3),
                    end=round(min(s.end, end), 3),
                    text=s.text.strip(),
                    avg_logprob=s.avg_logprob,
                    no_speech_prob=s.no_speech_prob,
                    compression_ratio=s.compression_ratio,
                    words=tuple(Word(w.start, w.end, w.word, w.probability) for w in (s.words or ())),
                )
            )
        return kept, dropped

    def _is_junk(self, s, end: float) -> bool:  # noqa: ANN001 - faster_whisper Segment
        """Whisper's own failure signals, applied after its temperature fallbacks.

        Real speech here scores no_speech_prob ~0.0-0.1 and avg_logprob ~-0.3; the classic
        hallucinations ("You", "Thank you." on trailing silence) score no_speech_prob > 0.6.
        A low log-probability alone is not junk: a sentence heard over moi's echo fell back to
        temperature 1.0 and scored -1.0..-1.2 with no_speech_prob 0.10 (tests/cloud/test_stt.py), while
        the words Whisper made up from echo residue scored the same log-probability with
        no_speech_prob 0.3-0.45 ("I see you.", "The people in the booth."). So a segment under
        the log-probability threshold is dropped only when Whisper also doubts there is speech
        (no_speech_prob over a third of its threshold, 0.2 by default).
        """
        cfg = self.cfg
        if not any(c.isalnum() for c in s.text) or s.start >= end - 0.1:
            return True  # no words at all ("", ".", "...", "♪"): no transcript
        if s.avg_logprob < cfg.logprob_threshold and s.no_speech_prob > cfg.no_speech_threshold / 3:
            return True
        if s.no_speech_prob > cfg.no_speech_threshold and s.avg_logprob < cfg.logprob_threshold / 2:
            return True
        return s.compression_ratio > cfg.compression_ratio_threshold


def cues_from_words(seg: Segment, max_chars: int = 84, max_s: float = 7.0, pause_s: float = 0.8) -> list[Segment]:
    """``seg`` cut into subtitle-sized segments at its words' times: after a sentence's end, at a
    pause of ``pause_s`` or more, and before a cue passes ``max_chars`` (two lines of 42) or
    ``max_s`` on screen."""
    if not seg.words:
        return [seg]
    groups: list[list[Word]] = [[]]
    for w in seg.words:
        group = groups[-1]
        if group:
            text = "".join(x.word for x in group).strip()
            if (text.endswith((".", "?", "!")) or w.start - group[-1].end >= pause_s
                    or len(text) + len(w.word) > max_chars or w.end - group[0].start > max_s):
                groups.append(group := [])
        group.append(w)
    return [
        replace(seg, start=round(g[0].start, 3), end=round(g[-1].end, 3), text="".join(w.word for w in g).strip(),
                words=tuple(g))
        for g in groups
    ]
