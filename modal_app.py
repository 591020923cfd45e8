"""moi on Modal: one GPU class that runs a whole turn, a transcriber for batch, and the gateway.

Thin on purpose: images, the secret, decorators. :class:`Voice` loads Whisper, the LLM and
Kokoro together (under 1.5 GB of GPU memory) and runs :func:`cloud.turn.run_turn` inside, so a
conversation holds one GPU container and an utterance is one call into it, from the laptop
(``/v1/turn``) as from the gateway. :class:`Transcriber` serves batch's ``.map`` fan-out. The
gateway is ``cloud.http.create_app`` over :class:`ModalEngine`. This file imports only ``cloud/`` and ``shared/`` (and
``cloud/`` only inside functions, so a build step needs nothing but ``shared/``); nothing
imports it: the laptop looks the deployed app up by name (``local/deployed.py``).

    modal secret create moi-api-key MOI_API_KEY=$(openssl rand -hex 24)
    MOI_MODAL_GPU=L4 modal deploy modal_app.py
    moi --remote --url modal               # the deployed gateway, found by name
    moi transcribe ./recordings -r --remote # batch: .map over Transcriber.transcribe_file

Deploy-time settings (environment of the `modal deploy` command): ``MOI_MODAL_GPU`` (default
``L4``; e.g. ``T4``, ``A10G``, ``L40S``, or a comma list to let Modal pick), ``MOI_MODAL_SCALEDOWN``
(seconds a warm container waits for the next request before scaling to zero, default 300),
``MOI_MODAL_LLM`` (the chat model baked into the image, default SmolLM2-135M-Instruct; e.g.
``HuggingFaceTB/SmolLM2-360M-Instruct`` or ``-1.7B-Instruct``: a model the laptop cannot run).
"""


import contextlib
import os
import threading
import uuid
from collections.abc import Iterator, Sequence

import modal

from shared.audio import SPEECH_RATE, Audio
from shared.config import MODAL_APP
from shared.engine import Clock, Speech, TurnRequest, when_cancelled
from shared.errors import EngineError
from shared.events import Event
from shared.messages import ChatOptions, Message, Transcription
from shared.models import HUB_DEFAULTS

APP_NAME = MODAL_APP
GPU: str | list[str] = [g.strip() for g in os.environ.get("MOI_MODAL_GPU", "L4").split(",")]
GPU = GPU[0] if len(GPU) == 1 else GPU
SCALEDOWN_S = int(os.environ.get("MOI_MODAL_SCALEDOWN", "300"))
# The chat model: chosen at deploy time, then carried in the images' environment (MOI_LLM_MODEL),
# where build steps and containers read it back.
LLM_MODEL = os.environ.get("MOI_MODAL_LLM") or os.environ.get("MOI_LLM_MODEL") or HUB_DEFAULTS["llm"]
SECRET_NAME = "moi-api-key"  # holds MOI_API_KEY, the bearer key the gateway checks
PYTHON = "3.11"
HF_HOME = "/models"  # weights are baked into each image under here at build time
SITE = f"/usr/local/lib/python{PYTHON}/site-packages"

app = modal.App(APP_NAME)

# Stop reaching the GPUs: closing a `remote_gen` stream does not stop the container's generator,
# and cancelling the call kills the whole container (modal-client issue #4125). So each streamed
# call gets a key; the caller puts it here to stop, and the container, polling every STOP_POLL_S,
# ends generation at its next token and synthesis at its next piece.
STOPS = modal.Dict.from_name("moi-stops", create_if_missing=True)
STOP_POLL_S = 0.05  # 20 Dict reads a second per open stream; a few tokens on a GPU


# --- images: weights downloaded at build time, so no container downloads at start ----------


def download_stt() -> None:
    from shared.models import resolve

    resolve("stt", HUB_DEFAULTS["stt"], download=True)


def download_voice() -> None:
    """Everything a turn needs: Whisper, the chat model chosen at deploy time, Kokoro."""
    from shared.models import resolve

    resolve("stt", HUB_DEFAULTS["stt"], download=True)
    resolve("llm", os.environ["MOI_LLM_MODEL"], download=True)
    resolve("tts", HUB_DEFAULTS["tts"], download=True)  # config.json, kokoro-v1_0.pth, voices/*.pt


_hub_env = {
    "HF_HOME": HF_HOME,
    "MOI_STT_MODEL": HUB_DEFAULTS["stt"],
    "MOI_LLM_MODEL": LLM_MODEL,
    "MOI_TTS_MODEL": HUB_DEFAULTS["tts"],
    "MOI_LLM_BACKEND": "transformers",
    "MOI_TTS_BACKEND": "torch",
}
# `run_function` runs in a build container that holds only this file and the image so far:
# everything this file imports at top level (modal, numpy, shared/) must be in the image first.
# `shared` goes in as a copied layer (copy=True) before the download; `cloud` is added last, so a
# change to it does not download the weights again.
_base = (
    modal.Image.debian_slim(python_version=PYTHON)
    .uv_pip_install("numpy>=1.26", "soxr>=0.3", "av>=12", "huggingface-hub>=0.23")
    .add_local_python_source("shared", copy=True)
)

_cuda_libs = {"LD_LIBRARY_PATH": f"{SITE}/nvidia/cublas/lib:{SITE}/nvidia/cudnn/lib"}
stt_image = (
    _base.uv_pip_install("faster-whisper>=1.1", "nvidia-cublas-cu12", "nvidia-cudnn-cu12==9.*", "onnxruntime>=1.17")
    .uv_pip_install("silero-vad>=5", extra_options="--no-deps")  # only for its silero_vad.onnx: no torch
    # CTranslate2 loads cuBLAS and cuDNN by name; the pip wheels put them here, off the loader's path.
    .env({**_hub_env, **_cuda_libs})
    .run_function(download_stt)
    .add_local_python_source("cloud")
)
voice_image = (
    _base.apt_install("espeak-ng")
    .uv_pip_install("torch==2.13.0", "transformers>=4.45", "accelerate>=0.30", "kokoro==0.9.4", "pip",
                    "faster-whisper>=1.1", "nvidia-cublas-cu12", "nvidia-cudnn-cu12==9.*")
    .run_commands("python -m spacy download en_core_web_sm")  # misaki's English G2P
    .env({**_hub_env, **_cuda_libs})
    .run_function(download_voice)
    .add_local_python_source("cloud")
)
# The gateway also listens, for /v1/realtime: Silero (its ONNX file) and Smart Turn (in the pipecat
# wheel) on onnxruntime, on the CPU, next to the socket.
gateway_image = (
    _base.uv_pip_install("fastapi>=0.110", "python-multipart>=0.0.9", "onnxruntime>=1.17")
    .uv_pip_install("silero-vad>=5", "pipecat-ai==1.14.0", extra_options="--no-deps")
    .env({"MOI_LLM_MODEL": LLM_MODEL})  # what /v1/models names
    .add_local_python_source("cloud")
)
IMAGES = {"stt": stt_image, "voice": voice_image, "gateway": gateway_image}


def _runners(device: str):
    """This container's runners, refusing to serve from the wrong device (a GPU class whose
    model landed on the CPU would bill the GPU and answer slowly: fail loudly instead)."""
    from cloud.runners import Runners
    from shared.config import Config

    return Runners(Config.load(), device=device)


_gpu_class = dict(
    gpu=GPU,
    scaledown_window=SCALEDOWN_S,
    timeout=600,
    enable_memory_snapshot=True,
    experimental_options={"enable_gpu_snapshot": True},  # alpha: snapshot GPU memory too
)
# What each GPU class must run on; `.local()` tests pass device="cpu" (a modal.parameter).
DEVICE = modal.parameter(default="cuda")


@contextlib.contextmanager
def _stoppable(key: str | None) -> Iterator[threading.Event]:
    """An event set once the caller has put ``key`` into :data:`STOPS` (or the block ends)."""
    cancel = threading.Event()

    def stopped() -> bool:
        try:
            return STOPS.contains(key)
        except (modal.exception.Error, ConnectionError, OSError) as exc:  # a blip: keep watching
            print(f"moi: stop flag unreadable for a moment ({type(exc).__name__}: {exc})", flush=True)
            cancel.wait(1.0)
            return False

    if not key:
        yield cancel
        return
    try:
        with when_cancelled(stopped, cancel.set, "moi-stop-watch", every_s=STOP_POLL_S):
            yield cancel
    finally:
        cancel.set()


# --- the GPU classes -----------------------------------------------------------------------


@app.cls(image=stt_image, **_gpu_class)
@modal.concurrent(max_inputs=4)  # CTranslate2 serves concurrent calls from one model
class Transcriber:
    """Batch: whole files fanned out with ``.map`` (``moi transcribe --remote``)."""
    device: str = DEVICE

    @modal.enter(snap=True)
    def load(self) -> None:
        from cloud.longform import BatchModels
        from cloud.vad import SileroVad
        from shared.models import resolve

        self.runners = _runners(self.device)
        self.runners.warm(("stt",))
        cfg = self.runners.cfg
        self.batch = BatchModels(self.runners.stt, SileroVad(resolve("vad", cfg.vad.model).path), cfg.vad)

    @modal.method()
    def transcribe_file(self, name: str, data: bytes, options: dict | None = None) -> dict:
        """One whole file for batch fan-out (`moi transcribe --remote`): VAD windows, timestamps
        on the file's clock; a bad file comes back as {"name", "error": {...}}, not raised."""
        from cloud.longform import transcribe_one

        return transcribe_one(name, data, options, self.batch)


@app.cls(image=voice_image, **_gpu_class)
@modal.concurrent(max_inputs=4)  # a few conversations share a container: the models are small
class Voice:
    """A whole turn on one GPU: Whisper, the chat model and Kokoro loaded together; also each
    model alone, for the OpenAI endpoints. Stop travels as a key in :data:`STOPS`."""

    device: str = DEVICE

    @modal.enter(snap=True)
    def load(self) -> None:
        from cloud.engine import LocalEngine

        self.runners = _runners(self.device)
        self.runners.warm()
        self.engine = LocalEngine(self.runners.cfg, self.runners)
        self.label = f"modal · {self.runners.model('llm').name}"  # who answered, in turn_done

    @modal.method()
    def turn(self, pcm16: bytes, sample_rate: int, request: TurnRequest, stop_key: str | None = None,
             ) -> Iterator[Event]:
        """One utterance's turn, its events as they come (``cloud.turn.run_turn`` in here)."""
        from dataclasses import replace

        from shared.events import TurnDone

        audio = Audio.from_pcm16(pcm16, sample_rate)
        with _stoppable(stop_key) as cancel:
            for ev in self.engine.turn(audio, request, cancel=cancel):
                yield replace(ev, engine=self.label) if isinstance(ev, TurnDone) else ev

    @modal.method()
    def transcribe(
        self, pcm16: bytes, sample_rate: int = SPEECH_RATE, language: str | None = None,
        prompt: str | None = None, word_timestamps: bool = False,
    ) -> Transcription:
        audio = Audio.from_pcm16(pcm16, sample_rate)
        return self.runners.stt.transcribe(audio, language=language, prompt=prompt, word_timestamps=word_timestamps)

    @modal.method()
    def chat(
        self, messages: list[tuple[str, str]], max_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
        repeat_penalty: float = 1.2, stop_key: str | None = None,
    ) -> Iterator[str]:
        """Tokens as they come; stops at the next token once ``stop_key`` is in STOPS."""
        thread = [Message(role, content) for role, content in messages]  # type: ignore[arg-type]
        options = ChatOptions(max_tokens=max_tokens, temperature=temperature, seed=seed, repeat_penalty=repeat_penalty)
        with _stoppable(stop_key) as cancel:
            yield from self.runners.chat.stream(thread, options, cancel)

    @modal.method()
    def voices(self) -> list[str]:
        return list(self.runners.tts.voices)

    @modal.method()
    def speak(
        self, text: str, voice: str | None = None, speed: float | None = None, split: bool = True,
        stop_key: str | None = None,
    ) -> Iterator[tuple[str, bytes, int]]:
        """(piece, PCM16 bytes, sample rate) per piece: sentences, the first clause early, or
        the text as one piece (``split=False``); stops before the next piece once ``stop_key``
        is in STOPS."""
        with _stoppable(stop_key) as cancel:
            for piece, audio in self.runners.tts.speak(text, voice=voice, speed=speed, split=split, cancel=cancel):
                yield piece, audio.to_pcm16(), audio.sample_rate


# --- the engine over the GPU classes, and the gateway that serves it ------------------------


@contextlib.contextmanager
def _modal_errors(what: str) -> Iterator[None]:
    """Modal's failures (auth, not deployed, container errors, timeouts) as EngineError: the
    gateway answers them in OpenAI's shape, and a client's FallbackEngine answers locally."""
    try:
        yield
    except modal.exception.Error as exc:
        raise EngineError(f"{what} on Modal failed: {type(exc).__name__}: {exc}") from exc


class ModalEngine:
    """The Engine protocol over :class:`Voice`: what the deployed gateway serves. A turn is one
    call into one container, which runs it whole and streams its events back.

    ``local=True`` runs the class in this process through Modal's ``.local()`` (its
    ``@modal.enter`` included) instead of ``.remote()``: the tests' double of the Modal call, and
    nothing else. A stream left early (Stop, a client gone) puts its key into :data:`STOPS`.
    """

    name = "modal"

    def __init__(self, voice=None, *, local: bool = False) -> None:  # noqa: ANN001
        self.voice = voice or Voice()
        self.local = local
        self._voices: list[str] | None = None

    def _stream(self, what: str, method, *args, cancel: threading.Event | None) -> Iterator:  # noqa: ANN001
        """A generator method's items; left before its end (Stop, ``cancel``, a consumer that
        closes it), the container is told to stop through :data:`STOPS`."""
        key = uuid.uuid4().hex
        with _modal_errors(what):
            stream = (method.local if self.local else method.remote_gen)(*args, stop_key=key)
            finished = False
            try:
                for item in stream:
                    yield item
                    if cancel is not None and cancel.is_set():
                        return
                finished = True
            finally:
                if not finished:
                    STOPS.put(key, True)
                stream.close()

    def _call(self, method):  # noqa: ANN001, ANN202 - a modal method
        return method.local if self.local else method.remote

    def warm(self, roles: tuple[str, ...] = ("stt", "llm", "tts")) -> None:
        """Nothing loads here: the models load in the GPU container."""

    def transcribe(
        self, audio: Audio, *, language: str | None = None, prompt: str | None = None,
        word_timestamps: bool = False,
    ) -> Transcription:
        pcm = audio.resample(SPEECH_RATE).to_pcm16()
        with _modal_errors("transcription"):
            return self._call(self.voice.transcribe)(pcm, SPEECH_RATE, language, prompt, word_timestamps)

    def chat(
        self, messages: Sequence[Message], *, options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        pairs = [(m.role, m.content) for m in messages]
        args = (pairs, options.max_tokens, options.temperature, options.seed, options.repeat_penalty)
        yield from self._stream("chat", self.voice.chat, *args, cancel=cancel)

    def speak(
        self, text: str, *, voice: str | None = None, speed: float | None = None,
        cancel: threading.Event | None = None, split: bool = True,
    ) -> Iterator[Speech]:
        for piece, pcm, rate in self._stream("speech", self.voice.speak, text, voice, speed, split, cancel=cancel):
            yield Speech(piece, Audio.from_pcm16(pcm, rate))

    def turn(
        self, audio: Audio, request: TurnRequest, *, cancel: threading.Event, clock: Clock | None = None
    ) -> Iterator[Event]:
        """One call: the container runs the whole turn; its events are stamped on ``clock`` here."""
        from dataclasses import replace

        from shared.engine import Stopwatch

        clock = clock or Stopwatch()
        pcm = audio.resample(SPEECH_RATE).to_pcm16()
        for ev in self._stream("the turn", self.voice.turn, pcm, SPEECH_RATE, request, cancel=cancel):
            yield replace(ev, t=clock())

    def voices(self) -> list[str]:
        if self._voices is None:
            with _modal_errors("voices"):
                self._voices = self._call(self.voice.voices)()
        return self._voices

    def models(self) -> list[dict]:
        out = [{"id": m, "role": r, "owned_by": "moi"}
               for r, m in (("stt", HUB_DEFAULTS["stt"]), ("llm", LLM_MODEL), ("tts", HUB_DEFAULTS["tts"]))]
        out[-1]["voices"] = self.voices()
        return out


@app.function(image=gateway_image, secrets=[modal.Secret.from_name(SECRET_NAME)], scaledown_window=SCALEDOWN_S)
@modal.concurrent(max_inputs=64)
@modal.asgi_app()
def web():
    from cloud.admission import Capacity
    from cloud.http import Limits, create_app

    # The GPU class scales out in containers of its own: the gateway lets many through at once.
    wide = Capacity(running=32, waiting=64)
    return create_app(ModalEngine(), api_key=os.environ.get("MOI_API_KEY"), limits=Limits(stt=wide, llm=wide, tts=wide))
