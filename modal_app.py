"""moi on Modal: one GPU class per model, a CPU gateway, and batch transcription.

Thin on purpose: images, the secret, decorators. Each class builds a ``cloud/`` runner in
``@modal.enter`` and forwards to it; everything worth testing lives in ``cloud/``.

    modal secret create moi-api-key MOI_API_KEY=$(openssl rand -hex 24)
    MOI_MODAL_GPU=L4 modal deploy modal_app.py
    modal run modal_app.py::transcribe_folder --path ./recordings

Deploy-time settings (environment of the `modal deploy` command): ``MOI_MODAL_GPU`` (default
``L4``; e.g. ``T4``, ``A10G``, ``L40S``, or a comma list to let Modal pick), ``MOI_MODAL_SCALEDOWN``
(seconds a warm container waits for the next request before scaling to zero, default 300).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import modal

from shared.audio import Audio
from shared.errors import EngineError
from shared.messages import ChatOptions, Message, Transcription
from shared.models import HUB_DEFAULTS

APP_NAME = "moi"
GPU: str | list[str] = [g.strip() for g in os.environ.get("MOI_MODAL_GPU", "L4").split(",")]
GPU = GPU[0] if len(GPU) == 1 else GPU
SCALEDOWN_S = int(os.environ.get("MOI_MODAL_SCALEDOWN", "300"))
SECRET_NAME = "moi-api-key"  # holds MOI_API_KEY, the bearer key the gateway checks
PYTHON = "3.11"
HF_HOME = "/models"  # weights are baked into each image under here at build time

app = modal.App(APP_NAME)


# --- images: weights downloaded at build time, so no container downloads at start ----------


def download_stt() -> None:
    from shared.models import resolve

    resolve("stt", HUB_DEFAULTS["stt"], download=True)


def download_llm() -> None:
    from shared.models import resolve

    resolve("llm", HUB_DEFAULTS["llm"], download=True)


def download_tts() -> None:
    from shared.models import resolve

    resolve("tts", HUB_DEFAULTS["tts"], download=True)  # config.json, kokoro-v1_0.pth, voices/*.pt


_hub_env = {
    "HF_HOME": HF_HOME,
    "MOI_STT_MODEL": HUB_DEFAULTS["stt"],
    "MOI_LLM_MODEL": HUB_DEFAULTS["llm"],
    "MOI_TTS_MODEL": HUB_DEFAULTS["tts"],
    "MOI_LLM_BACKEND": "transformers",
    "MOI_TTS_BACKEND": "torch",
}
_base = modal.Image.debian_slim(python_version=PYTHON).uv_pip_install(
    "numpy>=1.26", "soxr>=0.3", "av>=12", "huggingface-hub>=0.23"
)

stt_image = (
    _base.uv_pip_install("faster-whisper>=1.1", "nvidia-cublas-cu12", "nvidia-cudnn-cu12==9.*", "onnxruntime>=1.17")
    .uv_pip_install("silero-vad>=5", extra_options="--no-deps")  # only for its silero_vad.onnx: no torch
    .env(_hub_env)
    .run_function(download_stt)
    .add_local_python_source("cloud", "shared", "local")  # local.longform: the batch per-file work
)
llm_image = (
    _base.uv_pip_install("torch==2.13.0", "transformers>=4.45", "accelerate>=0.30")
    .env(_hub_env)
    .run_function(download_llm)
    .add_local_python_source("cloud", "shared")
)
tts_image = (
    _base.apt_install("espeak-ng")
    .uv_pip_install("torch==2.13.0", "kokoro==0.9.4", "pip")
    .run_commands("python -m spacy download en_core_web_sm")  # misaki's English G2P
    .env(_hub_env)
    .run_function(download_tts)
    .add_local_python_source("cloud", "shared")
)
gateway_image = _base.uv_pip_install("fastapi>=0.110", "python-multipart>=0.0.9").add_local_python_source(
    "cloud", "shared"
)


def _runners():
    from cloud.runners import Runners
    from shared.config import Config

    return Runners(Config.load())


_gpu_class = dict(
    gpu=GPU,
    scaledown_window=SCALEDOWN_S,
    timeout=600,
    enable_memory_snapshot=True,
    experimental_options={"enable_gpu_snapshot": True},  # alpha: snapshot GPU memory too
)


# --- one class per model ---------------------------------------------------------------------


@app.cls(image=stt_image, **_gpu_class)
@modal.concurrent(max_inputs=4)  # CTranslate2 serves concurrent calls from one model
class Transcriber:
    @modal.enter(snap=True)
    def load(self) -> None:
        from local.longform import BatchModels
        from local.vad import SileroVad
        from shared.models import resolve

        self.runners = _runners()
        self.runners.warm(("stt",))
        cfg = self.runners.cfg
        self.batch = BatchModels(self.runners.stt, SileroVad(resolve("vad", cfg.vad.model).path), cfg.vad)

    @modal.method()
    def transcribe(
        self, pcm16: bytes, sample_rate: int = 16_000, language: str | None = None,
        prompt: str | None = None, word_timestamps: bool = False,
    ) -> Transcription:
        audio = Audio.from_pcm16(pcm16, sample_rate)
        return self.runners.stt.transcribe(audio, language=language, prompt=prompt, word_timestamps=word_timestamps)

    @modal.method()
    def transcribe_file(self, name: str, data: bytes, options: dict | None = None) -> dict:
        """One whole file for batch fan-out (`moi transcribe --remote`): VAD windows, timestamps
        on the file's clock; a bad file comes back as {"name", "error": {...}}, not raised."""
        from local.longform import transcribe_one

        return transcribe_one(name, data, options, self.batch)


@app.cls(image=llm_image, **_gpu_class)
class Chatter:
    """One generation at a time per container (a single model context); Modal scales out."""

    @modal.enter(snap=True)
    def load(self) -> None:
        self.runners = _runners()
        self.runners.warm(("llm",))

    @modal.method()
    def chat(self, messages: list[tuple[str, str]], max_tokens: int = 64, temperature: float = 0.0) -> Iterator[str]:
        thread = [Message(role, content) for role, content in messages]  # type: ignore[arg-type]
        yield from self.runners.chat.stream(thread, ChatOptions(max_tokens=max_tokens, temperature=temperature))


@app.cls(image=tts_image, **_gpu_class)
class Speaker:
    @modal.enter(snap=True)
    def load(self) -> None:
        self.runners = _runners()
        self.runners.warm(("tts",))

    @modal.method()
    def voices(self) -> list[str]:
        return list(self.runners.tts.voices)

    @modal.method()
    def speak(self, text: str, voice: str | None = None, speed: float | None = None) -> Iterator[tuple[str, bytes, int]]:
        """(sentence, PCM16 bytes, sample rate) per sentence, first clause early."""
        for piece, audio in self.runners.tts.speak(text, voice=voice, speed=speed):
            yield piece, audio.to_pcm16(), audio.sample_rate


# --- the gateway: CPU only, each model behind it scales on its own ----------------------------


@contextlib.contextmanager
def _modal_errors(what: str) -> Iterator[None]:
    """Modal's failures (auth, not deployed, container errors, timeouts) as EngineError, so a
    client's FallbackEngine answers the utterance locally."""
    try:
        yield
    except modal.exception.Error as exc:
        raise EngineError(f"{what} on Modal failed: {type(exc).__name__}: {exc}") from exc


class ModalBackend:
    """The HTTP app's backend over the GPU classes (``cloud.http.Backend``): in the deployed
    gateway, and on a laptop with a Modal token through :meth:`deployed` (`moi --remote --url modal`)."""

    def __init__(self, transcriber=None, chatter=None, speaker=None) -> None:  # noqa: ANN001
        self.transcriber = transcriber or Transcriber()
        self.chatter = chatter or Chatter()
        self.speaker = speaker or Speaker()
        self._voices: list[str] | None = None

    @classmethod
    def deployed(cls, app_name: str = APP_NAME) -> ModalBackend:
        """The classes of the deployed app, looked up by name (lazy: no network until a call)."""
        return cls(*(modal.Cls.from_name(app_name, name)() for name in ("Transcriber", "Chatter", "Speaker")))

    def transcribe(self, audio: Audio, *, language=None, prompt=None, word_timestamps=False) -> Transcription:  # noqa: ANN001
        a = audio.resample(16_000)
        with _modal_errors("transcription"):
            return self.transcriber.transcribe.remote(a.to_pcm16(), 16_000, language, prompt, word_timestamps)

    def chat(self, messages: list[Message], options: ChatOptions, cancel: threading.Event | None = None) -> Iterator[str]:
        pairs = [(m.role, m.content) for m in messages]
        with _modal_errors("chat"):
            for piece in self.chatter.chat.remote_gen(pairs, options.max_tokens, options.temperature):
                if cancel is not None and cancel.is_set():
                    return
                yield piece

    def speak(self, text: str, *, voice=None, speed=None, cancel=None) -> Iterator[tuple[str, Audio]]:  # noqa: ANN001
        with _modal_errors("speech"):
            for piece, pcm, rate in self.speaker.speak.remote_gen(text, voice, speed):
                if cancel is not None and cancel.is_set():
                    return
                yield piece, Audio.from_pcm16(pcm, rate)

    def voices(self) -> list[str]:
        if self._voices is None:
            with _modal_errors("voices"):
                self._voices = self.speaker.voices.remote()
        return self._voices

    def models(self) -> list[dict]:
        return [{"id": HUB_DEFAULTS[r], "role": r, "owned_by": "moi"} for r in ("stt", "llm", "tts")]


@app.function(image=gateway_image, secrets=[modal.Secret.from_name(SECRET_NAME)], scaledown_window=SCALEDOWN_S)
@modal.concurrent(max_inputs=64)
@modal.asgi_app()
def web():
    from cloud.http import create_app

    return create_app(ModalBackend(), api_key=os.environ.get("MOI_API_KEY"))


# --- batch: a folder fanned out over the GPU class with .map -------------------------------


@app.local_entrypoint()
def transcribe_folder(
    path: str, output_dir: str = "", formats: str = "txt,srt,vtt,json", language: str = "", force: bool = False
) -> None:
    """`modal run modal_app.py::transcribe_folder --path DIR`: `moi transcribe DIR -r --remote` on this run's app."""
    from pathlib import Path

    from local.batch import BatchOptions, FileOptions, modal_mapper, plan_batch, run_batch
    from local.batch_cli import show_report
    from local.transcripts import parse_formats

    opts = BatchOptions(
        parse_formats(formats), Path(output_dir) if output_dir else None, recursive=True, force=force,
        file=FileOptions(language=language or None),
    )
    report = run_batch(plan_batch([Path(path)], opts), modal_mapper(Transcriber().transcribe_file))
    show_report(report)
    if report.exit_code:
        raise SystemExit(report.exit_code)
