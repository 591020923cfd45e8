"""Speech to text on faster-whisper (CTranslate2): int8 on CPU, float16 on CUDA.

Whisper invents text for silence and noise ("Thank you.", loops). This runner returns
nothing rather than junk: audio below an RMS floor never reaches the model, and segments
are dropped on Whisper's own signals (no-speech probability with low log-probability,
very low log-probability, high compression ratio = repetition).
"""

from __future__ import annotations

import numpy as np

from shared.audio import SPEECH_RATE, Audio
from shared.config import SttConfig
from shared.messages import Segment, Transcription, Word
from shared.models import ResolvedModel


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
        self.model = WhisperModel(
            str(model.path), device=self.device, compute_type=compute, cpu_threads=cfg.cpu_threads
        )
        self.multilingual = bool(self.model.model.is_multilingual)

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
        language = language or cfg.language
        if language and not self.multilingual and language != "en":
            language = "en"  # an English-only model: transcribe as English rather than fail
        if len(audio) < SPEECH_RATE // 10 or rms_db(audio.samples) < cfg.min_rms_db:
            return Transcription.empty(audio.seconds, language)
        words = cfg.word_timestamps if word_timestamps is None else word_timestamps
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
        kept: list[Segment] = []
        dropped = 0
        for s in segments:
            if self._is_junk(s, audio.seconds):
                dropped += 1
                continue
            kept.append(
                Segment(
                    start=round(s.start, 3),
                    end=round(min(s.end, audio.seconds), 3),
                    text=s.text.strip(),
                    avg_logprob=s.avg_logprob,
                    no_speech_prob=s.no_speech_prob,
                    compression_ratio=s.compression_ratio,
                    words=tuple(Word(w.start, w.end, w.word, w.probability) for w in (s.words or ())),
                )
            )
        text = " ".join(seg.text for seg in kept if seg.text).strip()
        return Transcription(text, tuple(kept), info.language, audio.seconds, dropped)

    def _is_junk(self, s, duration: float) -> bool:  # noqa: ANN001 - faster_whisper Segment
        """Whisper's own failure signals, applied after its temperature fallbacks.

        Real speech here scores no_speech_prob ~0.0-0.1 and avg_logprob ~-0.3; the classic
        hallucinations ("You", "see you next time") on clicks and trailing noise score
        no_speech_prob > 0.6 or avg_logprob < -1.
        """
        cfg = self.cfg
        if not any(c.isalnum() for c in s.text) or s.start >= duration - 0.1:
            return True  # no words at all ("", ".", "...", "♪"): no transcript
        if s.avg_logprob < cfg.logprob_threshold:
            return True
        if s.no_speech_prob > cfg.no_speech_threshold and s.avg_logprob < cfg.logprob_threshold / 2:
            return True
        return s.compression_ratio > cfg.compression_ratio_threshold
