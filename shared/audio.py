"""The one audio type: float32 mono samples in [-1, 1] with an explicit sample rate.

Conversions happen at the edges only: PCM16/WAV bytes for the wire and files, PyAV for
decoding any common container (wav, flac, mp3, opus, m4a…), soxr for resampling.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import AudioError, AudioTooLong

#: The rate every model input is brought to (Silero VAD and Whisper both want 16 kHz).
SPEECH_RATE = 16_000
# moi's spoken replies: Kokoro's rate, and the rate of every wire that carries them (/v1/audio/speech's
# pcm, /v1/turn's audio frames, the Realtime API's PCM16)
REPLY_RATE = 24_000


@dataclass(frozen=True, eq=False)
class Audio:
    """Float32 mono samples in [-1, 1] at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise AudioError(f"sample rate must be positive, got {self.sample_rate}")
        samples = np.asarray(self.samples)
        if samples.ndim != 1:
            raise AudioError(f"Audio holds mono samples (1-D), got shape {samples.shape}")
        if samples.dtype != np.float32:
            samples = samples.astype(np.float32)
        object.__setattr__(self, "samples", samples)

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def silence(cls, seconds: float, sample_rate: int = SPEECH_RATE) -> Audio:
        return cls(np.zeros(round(seconds * sample_rate), np.float32), sample_rate)

    @classmethod
    def concat(cls, parts: list[Audio], sample_rate: int | None = None) -> Audio:
        rate = sample_rate or (parts[0].sample_rate if parts else SPEECH_RATE)
        if not parts:
            return cls(np.zeros(0, np.float32), rate)
        return cls(np.concatenate([p.resample(rate).samples for p in parts]), rate)

    def resample(self, rate: int) -> Audio:
        """The same sound at ``rate`` Hz (soxr, high quality)."""
        if rate == self.sample_rate:
            return self
        if len(self.samples) == 0:
            return Audio(self.samples, rate)
        import soxr

        out = soxr.resample(self.samples, self.sample_rate, rate, quality="HQ")
        return Audio(out.astype(np.float32, copy=False), rate)

    def slice(self, start_s: float, end_s: float) -> Audio:
        a, b = round(start_s * self.sample_rate), round(end_s * self.sample_rate)
        return Audio(self.samples[max(a, 0) : max(b, 0)], self.sample_rate)

    # --- PCM16 / WAV at the edges -------------------------------------------------------

    def to_pcm16(self) -> bytes:
        # The inverse of from_pcm16 (and of FFmpeg's s16 → float): k / 32768 → k, so audio that
        # came from 16-bit samples crosses the wire unchanged.
        return np.clip(np.round(self.samples * 32768.0), -32768, 32767).astype("<i2").tobytes()

    @classmethod
    def from_pcm16(cls, data: bytes, sample_rate: int) -> Audio:
        if len(data) % 2:
            raise AudioError(f"PCM16 data has an odd number of bytes ({len(data)})")
        pcm = np.frombuffer(data, dtype="<i2")
        return cls(pcm.astype(np.float32) / 32768.0, sample_rate)

    def to_wav(self) -> bytes:
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.sample_rate)
            w.writeframes(self.to_pcm16())
        return buf.getvalue()

    def save_wav(self, path: str | Path) -> Path:
        """Write a PCM16 WAV atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.to_wav())
        tmp.replace(path)
        return path


#: Compressed formats OpenAI's speech endpoint offers: container, codec, rate, media type.
ENCODINGS: dict[str, tuple[str, str, int, str]] = {
    "mp3": ("mp3", "libmp3lame", REPLY_RATE, "audio/mpeg"),
    "opus": ("ogg", "libopus", 48_000, "audio/ogg"),  # opus in an Ogg container, as OpenAI sends it
    "aac": ("adts", "aac", REPLY_RATE, "audio/aac"),
    "flac": ("flac", "flac", REPLY_RATE, "audio/flac"),
}


class Encoder:
    """Audio in, encoded bytes out as they exist (PyAV): ``feed`` each piece, then ``close``.

    Streams: each ``feed`` returns what the encoder has finished so far, so a response can go
    out piece by piece; ``close`` flushes the rest and the container's trailer.
    """

    def __init__(self, fmt: str) -> None:
        import av

        if fmt not in ENCODINGS:
            raise AudioError(f"cannot encode {fmt!r}: use one of {', '.join(ENCODINGS)}")
        container, codec, self.rate, self.media_type = ENCODINGS[fmt]
        self._out = _Sink()
        self._container = av.open(self._out, "w", format=container)
        self._stream = self._container.add_stream(codec, rate=self.rate, layout="mono")
        self._av = av

    def feed(self, audio: Audio) -> bytes:
        pcm = np.frombuffer(audio.resample(self.rate).to_pcm16(), dtype="<i2").reshape(1, -1)
        if pcm.shape[1]:
            frame = self._av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = self.rate
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._out.take()

    def close(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._out.take()


class _Sink:
    """A write-only file for PyAV: what was written since the last ``take``."""

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, chunk: bytes) -> int:
        self._data += chunk
        return len(chunk)

    def take(self) -> bytes:
        out, self._data = bytes(self._data), bytearray()
        return out


def decode(
    source: str | Path | bytes, *, sample_rate: int = SPEECH_RATE, name: str | None = None,
    max_seconds: float | None = None,
) -> Audio:
    """Decode any common audio file (or its bytes) to mono float32 at ``sample_rate``.

    PyAV (FFmpeg) does the container and codec work; channels are averaged to mono; soxr
    resamples. Raises :class:`AudioError` with a one-line reason for anything that is not
    decodable audio or that holds no samples. With ``max_seconds``, audio longer than that
    raises :class:`AudioTooLong` as soon as the container says so, or as soon as decoding
    passes it (a container may not say, or lie): never after decoding it all.
    """
    import av

    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        if not source:
            raise AudioError(f"{label}: empty input (0 bytes)")
        handle: io.BytesIO | str = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise AudioError(f"{label}: no such file")
        if path.is_dir():
            raise AudioError(f"{label}: is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{label}: empty file (0 bytes)")
        handle = str(path)

    chunks: list[np.ndarray] = []
    native_rate = 0
    try:
        with av.open(handle, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError(f"{label}: holds no audio stream")
            stream = container.streams.audio[0]
            native_rate = stream.rate or stream.codec_context.sample_rate or 0
            if max_seconds is not None:
                _check_length(label, _declared_seconds(container, stream), max_seconds)
            limit = None if max_seconds is None or not native_rate else int((max_seconds + 1) * native_rate)
            decoded = 0
            # Planar float at the native rate and layout; channels are averaged here (FFmpeg's
            # own down-mix scales by 1/sqrt(2) per channel and can clip) and soxr resamples.
            resampler = av.AudioResampler(format="fltp", rate=native_rate or None)
            try:
                for frame in container.decode(stream):
                    for out in resampler.resample(frame):
                        chunks.append(out.to_ndarray().mean(axis=0))
                        decoded += len(chunks[-1])
                    if limit is not None and decoded > limit:
                        _check_length(label, decoded / native_rate, max_seconds or 0.0)
            except av.error.InvalidDataError:
                # A truncated file: keep what decoded, as FFmpeg itself does.
                pass
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0))
    except AudioError:
        raise
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise AudioError(f"{label}: not a readable audio file ({_reason(exc)})") from exc

    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if len(samples) == 0:
        raise AudioError(f"{label}: contains no audio samples (0 s)")
    if not native_rate:
        raise AudioError(f"{label}: audio stream has no sample rate")
    if max_seconds is not None:
        _check_length(label, len(samples) / native_rate, max_seconds)
    if not np.isfinite(samples).all():
        raise AudioError(f"{label}: holds NaN or infinite samples (a broken float file), not audio")
    return Audio(samples, native_rate).resample(sample_rate)


def _declared_seconds(container, stream) -> float:  # noqa: ANN001 - PyAV objects
    """What the file says its length is (0 when it does not say)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return 0.0


def _check_length(label: str, seconds: float, limit: float) -> None:
    if seconds > limit:
        raise AudioTooLong(f"{label}: {seconds:.1f} s of audio; the limit is {limit:g} s", seconds, limit)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split("] ", 1)[-1]
