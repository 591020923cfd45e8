"""Text to speech at 24 kHz, with three backends behind one interface.

- ``onnx``: Kokoro-82M through kokoro-onnx on the int8 ONNX export (CPU, offline); espeak-ng
  G2P comes bundled with it (espeakng-loader), so English phonemes need no system package.
- ``torch``: Kokoro-82M through the hexgrad ``kokoro`` package (misaki G2P) on the hub
  weights: the GPU path.
- ``piper``: a Piper (VITS) voice through piper-tts, which bundles its own espeak-ng: ~9x
  faster than Kokoro on a CPU, the offline default (``piper-joe``), resampled to 24 kHz with soxr.

``speak`` splits the text into sentences (the first clause early) and yields one
:class:`Audio` per piece, so playback can start before the whole reply is synthesized. Its
``cancel`` (Stop, a barge-in) ends a piece's synthesis where it is, not only before the next:
on a busy 2-core laptop an 80-character piece takes up to 6 s (measured live), and the
person's next turn waited for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from shared.audio import REPLY_RATE, Audio
from shared.config import TtsConfig, cpu_cores
from shared.engine import Speech, when_cancelled
from shared.errors import ConfigError, ModelNotFound
from shared.models import ResolvedModel, voice_names
from shared.text import split_sentences

SPEEDS = (0.5, 2.0)  # what Kokoro takes (Piper takes any; held to the same)
# Piper's joe speaks ~5 dB under Kokoro (RMS -25 against -19.5 dBFS, peaks up to -3.3): raised
# 3 dB, so moi sounds as loud whichever voice it has, and its peaks stay under full scale.
PIPER_GAIN = 1.4
HUB_VOICE = "af_heart"
PACK_VOICE = "jf_alpha"


class Interrupted(Exception):
    """``cancel`` was set while a piece was being synthesized: it was given up."""


class TtsBackend(Protocol):
    name: str
    device: str
    voices: tuple[str, ...]

    def synthesize(
        self, text: str, voice: str, speed: float, lang: str, cancel: threading.Event | None = None
    ) -> np.ndarray: ...


class _Abortable:
    """An onnxruntime session whose runs another thread can end (``RunOptions.terminate``,
    checked between the graph's nodes): ``watching(cancel)`` ends those it starts once
    ``cancel`` is set."""

    def __init__(self, session, ort) -> None:  # noqa: ANN001 - an ort.InferenceSession, the module
        self._session, self._ort = session, ort
        self._options = None  # those of the run being watched

    def run(self, output_names, inputs, run_options=None):  # noqa: ANN001, ANN201 - InferenceSession.run
        return self._session.run(output_names, inputs, run_options or self._options)

    @contextmanager
    def watching(self, cancel: threading.Event | None) -> Iterator[None]:
        if cancel is None:
            yield
            return
        options = self._options = self._ort.RunOptions()
        try:
            with when_cancelled(cancel.is_set, lambda: setattr(options, "terminate", True), "moi-tts-cancel"):
                yield
        except Exception as exc:  # onnxruntime's "Exiting due to terminate flag being set to true"
            if options.terminate:
                raise Interrupted from exc
            raise
        finally:
            self._options = None
        if options.terminate:  # set as the last node finished: the audio is whole, but not wanted
            raise Interrupted


def _cpu_session(ort, model: ResolvedModel, cfg: TtsConfig):  # noqa: ANN001, ANN202 - the module, an InferenceSession
    """A TTS model's onnxruntime session on every core, with threads that sleep when idle instead
    of spinning. A piece only runs while the LLM waits (cloud.engine.SpeechFirst), so the cores
    are its own: a 4-word Kokoro piece took 577 ms on 2 such threads against 944 ms on one, and
    with another program busy on one core 896 against 931 ms (2 spinning threads: 1127 ms)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.threads or cpu_cores()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model.path), sess_options=opts, providers=["CPUExecutionProvider"])


class KokoroOnnx:
    name = "onnx"
    device = "cpu"  # CPUExecutionProvider

    def __init__(self, model: ResolvedModel, cfg: TtsConfig) -> None:
        try:
            import onnxruntime as ort
            from kokoro_onnx import Kokoro
        except ImportError as exc:
            raise ModelNotFound("the onnx TTS backend needs `pip install kokoro-onnx`") from exc
        voices = model.extras.get("voices")
        if voices is None:
            raise ModelNotFound(f"tts: {model.name} has no voices file; put voices*.npz beside the model")
        session = _cpu_session(ort, model, cfg)
        self.kokoro = Kokoro.from_session(session, str(voices))
        self.kokoro.sess = self._session = _Abortable(session, ort)  # what kokoro-onnx runs the model on
        self.voices = tuple(sorted(self.kokoro.get_voices()))
        self._lock = threading.Lock()

    def synthesize(
        self, text: str, voice: str, speed: float, lang: str, cancel: threading.Event | None = None
    ) -> np.ndarray:
        with self._lock, self._session.watching(cancel):
            samples, rate = self.kokoro.create(text, voice=voice, speed=speed, lang=lang)
        assert rate == REPLY_RATE, rate
        return np.asarray(samples, dtype=np.float32)


class KokoroTorch:
    name = "torch"

    def __init__(self, model: ResolvedModel, cfg: TtsConfig) -> None:
        try:
            import torch
            from kokoro import KModel, KPipeline
        except ImportError as exc:
            raise ModelNotFound("the torch TTS backend needs `pip install kokoro` (GPU image)") from exc
        self.torch = torch
        root = model.path
        weights = sorted(root.glob("*.pth"))
        if not weights or not (root / "config.json").exists():
            raise ModelNotFound(f"tts: {root} lacks Kokoro's config.json and *.pth weights")
        self.device = device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = KModel(repo_id="hexgrad/Kokoro-82M", config=str(root / "config.json"), model=str(weights[0]))
        self.model = self.model.to(device).eval()
        self.voice_dir = root / "voices"
        self.voices = tuple(sorted(p.stem for p in self.voice_dir.glob("*.pt")))
        self._pipelines: dict[str, KPipeline] = {}
        self._KPipeline = KPipeline
        self._lock = threading.Lock()
        # The G2P pipeline (misaki + spaCy) takes seconds to build: build the default voice's
        # now, at load (inside Modal's snapshotted @enter), not on the first request.
        default = cfg.voice if cfg.voice not in ("", "auto") else HUB_VOICE
        self._pipeline(default[0])

    def _pipeline(self, code: str):  # noqa: ANN202 - a kokoro.KPipeline
        pipeline = self._pipelines.get(code)
        if pipeline is None:
            pipeline = self._KPipeline(lang_code=code, repo_id="hexgrad/Kokoro-82M", model=self.model)
            self._pipelines[code] = pipeline
        return pipeline

    def synthesize(
        self, text: str, voice: str, speed: float, lang: str, cancel: threading.Event | None = None
    ) -> np.ndarray:
        code = voice[0] if voice else "a"  # Kokoro voices start with their language code
        with self._lock:
            pipeline = self._pipeline(code)
            parts = []
            for r in pipeline(text, voice=str(self.voice_dir / f"{voice}.pt"), speed=speed):
                if cancel is not None and cancel.is_set():  # between Kokoro's own chunks
                    raise Interrupted
                if r.audio is not None:
                    parts.append(np.asarray(r.audio.cpu().numpy() if hasattr(r.audio, "cpu") else r.audio, np.float32))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


class PiperOnnx:
    name = "piper"
    device = "cpu"

    def __init__(self, model: ResolvedModel, cfg: TtsConfig) -> None:
        try:
            import onnxruntime as ort
            from piper import PiperVoice, SynthesisConfig
            from piper.config import PiperConfig
        except ImportError as exc:
            raise ModelNotFound("the piper TTS backend needs `pip install piper-tts`") from exc
        import json

        config = PiperConfig.from_dict(json.loads(model.extras["config"].read_text(encoding="utf-8")))
        self._session = _Abortable(_cpu_session(ort, model, cfg), ort)
        self.voice = PiperVoice(config=config, session=self._session)  # piper runs self.session.run
        self._Synthesis = SynthesisConfig
        self.voices = tuple(voice_names(model))
        self._lock = threading.Lock()

    def synthesize(
        self, text: str, voice: str, speed: float, lang: str, cancel: threading.Event | None = None
    ) -> np.ndarray:
        import soxr

        config = self.voice.config
        # the voice's own loudness (piper's default scales every sentence to full scale, so
        # pieces of one reply would jump in level); lang is the voice's own espeak voice
        synthesis = self._Synthesis(
            speaker_id=config.speaker_id_map.get(voice), length_scale=config.length_scale / speed, normalize_audio=False
        )
        with self._lock, self._session.watching(cancel):
            parts = [c.audio_float_array for c in self.voice.synthesize(text, synthesis)]
        samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        samples = soxr.resample(samples, config.sample_rate, REPLY_RATE) * PIPER_GAIN
        return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


def _from_onset(samples: np.ndarray, floor: float = 10 ** (-50 / 20), keep_s: float = 0.01) -> np.ndarray:
    """``samples`` from 10 ms before their first sound above -50 dBFS: Kokoro starts each piece
    with 30-50 ms of near silence (after kokoro-onnx's own trim), which the first piece would
    make the person wait through."""
    loud = np.flatnonzero(np.abs(samples) > floor)
    if not len(loud):
        return samples
    return samples[max(0, int(loud[0]) - int(keep_s * REPLY_RATE)) :]


class TextToSpeech:
    """Kokoro or Piper behind one interface; ``speak`` yields audio sentence by sentence."""

    def __init__(self, model: ResolvedModel, cfg: TtsConfig = TtsConfig()) -> None:
        backend = cfg.backend
        if backend == "auto":
            backend = {"kokoro-torch": "torch", "piper": "piper"}.get(model.format, "onnx")
        if (backend == "piper") != (model.format == "piper"):
            raise ConfigError(f"the {backend} tts backend cannot load {model.name} ({model.format})")
        if backend == "onnx":
            self.backend: TtsBackend = KokoroOnnx(model, cfg)
        elif backend == "torch":
            self.backend = KokoroTorch(model, cfg)
        elif backend == "piper":
            self.backend = PiperOnnx(model, cfg)
        else:
            raise ConfigError(f"unknown tts backend {cfg.backend!r}: use onnx, torch, piper or auto")
        self.cfg = cfg
        self.model_info = model
        self.device = self.backend.device
        self.default_voice = self.resolve_voice(cfg.voice)

    @property
    def voices(self) -> tuple[str, ...]:
        return self.backend.voices

    def resolve_voice(self, voice: str | None) -> str:
        if not voice or voice == "auto":
            for v in (HUB_VOICE, PACK_VOICE):
                if v in self.voices:
                    return v
            return self.voices[0]
        if voice not in self.voices:
            raise ConfigError(f"unknown voice {voice!r}; this model has: {', '.join(self.voices)}")
        return voice

    def synthesize(
        self, text: str, *, voice: str | None = None, speed: float | None = None, cancel: threading.Event | None = None
    ) -> Audio:
        """One piece of text as one Audio (no splitting). ``speed`` is held to Kokoro's 0.5-2.0
        (OpenAI's API allows 0.25-4.0; the model refuses the rest). Raises Interrupted when
        ``cancel`` is set before it is done."""
        speed = min(SPEEDS[1], max(SPEEDS[0], speed or self.cfg.speed))
        samples = self.backend.synthesize(
            text, self.resolve_voice(voice or self.default_voice), speed, self.cfg.lang, cancel
        )
        return Audio(_from_onset(samples), REPLY_RATE)

    def speak(
        self,
        text: str,
        *,
        voice: str | None = None,
        speed: float | None = None,
        cancel: threading.Event | None = None,
        split: bool = True,
    ) -> Iterator[Speech]:
        """(piece, audio) for each sentence of ``text``, the first clause first; with
        ``split=False`` the text is one piece (a turn cuts its reply once, itself)."""
        pieces = split_sentences(text, self.cfg.first_clause_chars, self.cfg.first_words, self.cfg.max_piece_chars) if split else [text]
        for piece in pieces:
            if cancel is not None and cancel.is_set():
                return
            try:
                audio = self.synthesize(piece, voice=voice, speed=speed, cancel=cancel)
            except Interrupted:
                return
            yield Speech(piece, audio)
