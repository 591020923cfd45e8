"""Shared fixtures: the real audio handouts and the real offline models, loaded once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import Config
from shared.models import resolve

ROOT = Path(__file__).resolve().parents[1]
AUDIO = Path(__file__).resolve().parent / "data"  # real recordings, in the repository (data/README.md)


def audio_file(name: str) -> Path:
    path = AUDIO / name
    if not path.exists():
        pytest.fail(f"recording {path} is missing from the repository (see tests/data/README.md)")
    return path


def words(text: str) -> set[str]:
    """The words of ``text`` as said: lower case, no punctuation, small numbers spelled ("5" is "five")."""
    from shared.text import spoken_words

    return set(spoken_words(text))


def said_back(text: str, heard: str, share: float = 0.7) -> bool:
    """Whether ``heard`` (Whisper on moi's voice) holds ``share`` of ``text``'s words. Piper, the
    offline voice, draws its timing at random, and tiny.en then mishears a word now and then
    ("Below there", "double in" for Dublin), never most of them."""
    said = words(text)
    return len(said & words(heard)) >= share * len(said)


@pytest.fixture(scope="session")
def speech60() -> Audio:
    return decode(audio_file("speech_60s_16k.wav"))


@pytest.fixture(scope="session")
def clatter() -> Audio:
    return decode(audio_file("speech_with_clatter_16k.wav"))


@pytest.fixture(scope="session")
def vad_model():
    from cloud.vad import SileroVad

    return SileroVad(resolve("vad").path)


@pytest.fixture(scope="session")
def runners():
    from cloud.runners import Runners

    # Whole-prompt evaluation: tests compare replies for equality across calls and engines.
    return Runners(Config.load(env={}, llm__reuse_prefix=False))


@pytest.fixture(scope="session")
def stt(runners):
    return runners.stt


@pytest.fixture(scope="session")
def tts(runners):
    return runners.tts


@pytest.fixture(scope="session")
def kokoro():
    """Kokoro's offline pack (``--tts kokoro-int8``): the second voice; ``tts`` is the default's, Piper."""
    from cloud.tts import TextToSpeech

    return TextToSpeech(resolve("tts", "kokoro-int8"))


@pytest.fixture(scope="session")
def chat(runners):
    return runners.chat


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def noise(rng: np.random.Generator, seconds: float, level: float = 0.1) -> Audio:
    return Audio((rng.standard_normal(int(seconds * SPEECH_RATE)) * level).astype(np.float32), SPEECH_RATE)


@contextmanager
def serve(app, lifespan: str = "off") -> Iterator[str]:
    """``app`` on uvicorn at 127.0.0.1:<free port> in a background thread, for the block's length
    (``lifespan="on"`` runs the app's startup and shutdown, e.g. the web view's ticker)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan, ws="auto"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def silence_flac(hours: float, declared: bool = True, rate: int = 8000) -> bytes:
    """A small FLAC holding ``hours`` of digital silence (~0.7 MB an hour): a decompression bomb.
    ``declared=False`` writes it as a stream would, so its header does not say how long it is."""
    import io

    import av

    class Stream:  # write-only, no seek: FLAC cannot go back to fill in its length
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, chunk: bytes) -> int:
            self.data += chunk
            return len(chunk)

    out = io.BytesIO() if declared else Stream()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        minute = np.zeros((1, rate * 60), np.int16)
        for _ in range(round(hours * 60)):
            frame = av.AudioFrame.from_ndarray(minute, format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue() if declared else bytes(out.data)


@pytest.fixture(scope="session")
def bombs() -> dict[str, bytes]:
    """3 h of silence in ~2 MB, with and without its length in the header."""
    return {"declared": silence_flac(3), "undeclared": silence_flac(3, declared=False)}
