"""Long-form transcription of one file: the VAD cuts it into windows Whisper can take, and every
segment and word time goes back onto the file's clock.

:func:`transcribe_one` is the unit of batch work wherever it runs: in a local worker process
(:mod:`local.batch`) or in Modal's GPU class (``modal_app.Transcriber.transcribe_file``). It
takes the models as an argument and returns a JSON-ready dict, so it crosses process and
network boundaries as is.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cloud.stt import SpeechToText
from cloud.vad import Segmenter, SileroVad, SpeechEnd
from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import VadConfig
from shared.errors import AudioError

Result = dict[str, Any]


@dataclass(frozen=True)
class FileOptions:
    language: str | None = None  # None: the model's (English for .en models, else detected)
    prompt: str | None = None  # hotwords / spelling hints for Whisper
    max_window_s: float = 29.0  # longest span sent to Whisper in one call (it sees 30 s)
    max_gap_s: float = 3.0  # silence between utterances that starts a new window
    word_timestamps: bool = True  # an alignment pass per window: cue and word times (txt alone needs none)
    batch_size: int = 8  # windows through Whisper at once (BatchedInferencePipeline)

    @classmethod
    def of(cls, value: FileOptions | Mapping[str, Any] | None) -> FileOptions:
        """Options from themselves or from their dict (what crosses the wire to Modal)."""
        return value if isinstance(value, FileOptions) else cls(**(value or {}))


@dataclass(frozen=True)
class BatchModels:
    """What :func:`transcribe_one` runs: Whisper and Silero, loaded by the caller."""

    stt: SpeechToText
    vad: SileroVad
    vad_cfg: VadConfig = field(default_factory=VadConfig)


def speech_windows(audio: Audio, vad: SileroVad, cfg: VadConfig, max_gap_s: float) -> list[tuple[float, float]]:
    """Spans (s) of ``audio`` worth transcribing: the VAD's utterances (each at most
    ``cfg.max_utterance_s``) packed into windows no longer than that, a new window starting
    wherever the silence between two utterances exceeds ``max_gap_s``.

    Packing matters for speed: Whisper encodes 30 s whatever it is given, so ten 3 s
    utterances cost ten encoder passes and one 30 s window costs one.
    """
    seg = Segmenter(vad, replace(cfg, speculate_ms=0))  # a file has no turns to start early
    events = []
    step = 30 * SPEECH_RATE
    for i in range(0, len(audio), step):
        events += seg.feed(audio.samples[i : i + step])
    events += seg.flush()
    windows: list[tuple[float, float]] = []
    for e in events:
        if not isinstance(e, SpeechEnd) or e.dropped:
            continue
        if windows and e.at - windows[-1][0] <= cfg.max_utterance_s and e.start - windows[-1][1] <= max_gap_s:
            windows[-1] = (windows[-1][0], e.at)
        else:
            windows.append((e.start, e.at))
    return windows


def transcribe_one(
    name: str, source: bytes | str | Path, options: FileOptions | Mapping[str, Any] | None, models: BatchModels
) -> Result:
    """Transcribe one whole file (any format PyAV reads) given as bytes or a path.

    Returns ``{"name", "language", "duration", "model", "text", "segments", "windows",
    "speech_s", "processing_s"}`` with segment and word times on the file's clock, or
    ``{"name", "error": {"message", "type", "code"}, "processing_s"}`` when the file is not
    usable audio. Other failures (a broken model) raise. Safe to call from several threads.
    """
    t0 = time.perf_counter()
    opts = FileOptions.of(options)
    try:
        audio = decode(source if isinstance(source, bytes) else Path(source), name=name)
    except AudioError as exc:
        return error_result(name, exc, time.perf_counter() - t0)
    vad = copy.copy(models.vad)  # shares the ONNX session, gets its own recurrent state
    windows = speech_windows(audio, vad, replace(models.vad_cfg, max_utterance_s=opts.max_window_s), opts.max_gap_s)
    heard = models.stt.transcribe_windows(
        audio, windows, language=opts.language, prompt=opts.prompt, word_timestamps=opts.word_timestamps,
        batch_size=opts.batch_size,
    )
    language = opts.language or heard.language
    segments = [
        {"start": _t(s.start), "end": _t(s.end), "text": s.text,
         "words": [{"start": _t(w.start), "end": _t(w.end), "word": w.word.strip(),
                    "probability": round(float(w.probability), 3)} for w in s.words]}
        for s in heard.segments
    ]
    _clamp(segments, audio.seconds)
    return {
        "name": name,
        "language": language,
        "duration": round(audio.seconds, 3),
        "model": models.stt.model_info.name,
        "text": " ".join(s["text"] for s in segments if s["text"]),
        "segments": segments,
        "windows": len(windows),
        "speech_s": round(sum(b - a for a, b in windows), 3),
        "processing_s": round(time.perf_counter() - t0, 3),
    }


def _t(seconds: float) -> float:
    return round(float(seconds), 3)


def _clamp(segments: list[dict[str, Any]], duration: float) -> None:
    """Keep every time inside [0, duration], starts never going back, ends never before starts."""
    last = 0.0
    for seg in segments:
        seg["start"] = last = min(max(seg["start"], last), duration)
        seg["end"] = min(max(seg["end"], seg["start"]), duration)
        word_last = seg["start"]
        for w in seg["words"]:
            w["start"] = word_last = min(max(w["start"], word_last), duration)
            w["end"] = min(max(w["end"], w["start"]), duration)


def error_result(name: str, exc: BaseException, processing_s: float = 0.0) -> Result:
    """A failed file in OpenAI's error shape; the message is one line."""
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if not isinstance(exc, AudioError):
        message = f"{type(exc).__name__}: {message}"
    code = "bad_audio" if isinstance(exc, AudioError) else "internal"
    return {"name": name, "error": {"message": message, "type": type(exc).__name__, "code": code},
            "processing_s": round(processing_s, 3)}
