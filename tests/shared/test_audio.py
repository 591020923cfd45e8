import wave

import av
import numpy as np
import pytest

from shared.audio import SPEECH_RATE, Audio, decode
from shared.errors import AudioError
from tests.conftest import audio_file


@pytest.mark.parametrize(
    "name, seconds",
    [
        ("speech_60s_16k.wav", 60.0),
        ("comfyui_hotword.mp3", 4.0),
        ("speech_short.opus", 8.0),
        ("two_speakers_stereo_5s.wav", 5.0),
    ],
)
def test_decodes_common_formats_to_16k_mono(name, seconds):
    audio = decode(audio_file(name))
    assert audio.sample_rate == SPEECH_RATE
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.seconds - seconds) < 0.6
    assert 0.01 < np.abs(audio.samples).max() <= 1.0


def test_stereo_is_averaged_to_mono():
    path = audio_file("two_speakers_stereo_5s.wav")
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2).astype(np.float32) / 32768
    mono = decode(path).samples
    assert np.allclose(mono, pcm.mean(axis=1), atol=2e-4)
    # the two channels really differ, so a channel pick would fail the check above
    assert np.abs(pcm[:, 0] - pcm[:, 1]).mean() > 0.01


def _encode(path, audio: Audio, codec: str, rate: int):
    pcm = (np.clip(audio.resample(rate).samples, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def test_8khz_and_flac_m4a_are_resampled(tmp_path, speech60):
    clip = speech60.slice(9.0, 14.0)
    for codec, suffix, rate in (("pcm_s16le", "wav", 8000), ("flac", "flac", 44100), ("aac", "m4a", 22050)):
        path = tmp_path / f"clip.{suffix}"
        _encode(path, clip, codec, rate)
        back = decode(path)
        assert back.sample_rate == SPEECH_RATE
        assert abs(back.seconds - clip.seconds) < 0.1
        if codec == "flac":  # lossless at another rate: the same waveform after two resamples
            n = min(len(back), len(clip))
            assert np.corrcoef(back.samples[:n], clip.samples[:n])[0, 1] > 0.99


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        decode(path)


def test_text_file_named_wav_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file") as info:
        decode(path)
    assert "\n" not in str(info.value)


def test_zero_sample_wav_is_a_clear_error(tmp_path):
    path = tmp_path / "zero.wav"
    Audio(np.zeros(0, np.float32), SPEECH_RATE).save_wav(path)
    assert path.stat().st_size == 44
    with pytest.raises(AudioError, match="no audio samples"):
        decode(path)


def test_truncated_mp3_decodes_what_is_there():
    data = audio_file("comfyui_hotword.mp3").read_bytes()
    full = decode(data)
    half = decode(data[: len(data) // 2], name="half.mp3")
    assert 0.3 * full.seconds < half.seconds < 0.7 * full.seconds
    with pytest.raises(AudioError):
        decode(data[:100], name="stub.mp3")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        decode(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="directory"):
        decode(tmp_path)


def test_pcm16_and_wav_round_trip(speech60, tmp_path):
    clip = speech60.slice(10, 12)
    back = Audio.from_pcm16(clip.to_pcm16(), clip.sample_rate)
    # A 16-bit recording crosses PCM16 (the /v1/turn wire) and WAV unchanged, sample for sample:
    # a local and a remote engine hear exactly the same utterance.
    assert np.array_equal(back.samples, clip.samples)
    path = clip.save_wav(tmp_path / "x.wav")
    assert np.array_equal(decode(path).samples, clip.samples)
    loud = Audio(np.array([-1.5, -1.0, 0.5, 1.0, 1.5], np.float32), 16000)  # clipped, never wrapped
    assert np.frombuffer(loud.to_pcm16(), "<i2").tolist() == [-32768, -32768, 16384, 32767, 32767]
    with pytest.raises(AudioError, match="odd number"):
        Audio.from_pcm16(b"\x00\x01\x02", 16000)


def test_audio_type_checks():
    with pytest.raises(AudioError, match="mono"):
        Audio(np.zeros((10, 2), np.float32), 16000)
    with pytest.raises(AudioError, match="positive"):
        Audio(np.zeros(10, np.float32), 0)
    assert Audio(np.zeros(10, np.float64), 16000).samples.dtype == np.float32
    up = Audio(np.zeros(16000, np.float32), 16000).resample(24000)
    assert len(up) == 24000 and up.sample_rate == 24000


@pytest.mark.parametrize("kind", ["declared", "undeclared"])
def test_a_decompression_bomb_stops_at_the_limit(bombs, kind):
    """3 h of silence in 2 MB: refused from the header when it tells, else as decoding passes
    the limit; never decoded whole (that took a server from 1.4 to 6.8 GB)."""
    import resource
    import time

    from shared.errors import AudioTooLong

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(AudioTooLong, match="the limit is 600 s") as info:
        decode(bombs[kind], max_seconds=600)
    assert info.value.limit == 600 and info.value.seconds > 600
    assert time.monotonic() - started < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: well under 200 MB
    assert decode(bombs[kind][: 200_000]).seconds > 60  # a cut piece of it is fine without a limit


def test_nan_or_infinite_samples_are_not_audio(tmp_path):
    path = tmp_path / "nan.wav"
    samples = np.array([0.1, np.nan, np.inf, -0.2] * 4000, dtype="<f4")
    with open(path, "wb") as f:  # a float WAV (format 3): the stdlib wave module writes only PCM
        data = samples.tobytes()
        f.write(b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little"))
        f.write((3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little"))
        f.write((64000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little"))
        f.write(b"data" + len(data).to_bytes(4, "little") + data)
    with pytest.raises(AudioError, match="NaN or infinite"):
        decode(path)
