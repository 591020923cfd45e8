"""The `moi` command as a user runs it: a real subprocess, real models."""

import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest

from shared.audio import SPEECH_RATE, Audio, decode
from tests.conftest import ROOT, audio_file, words


def moi(*args, timeout=300):
    env = {**os.environ, "MOI_LLM_MAX_TOKENS": "16"}
    return subprocess.run(
        [sys.executable, "-m", "local.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_transcribe_json_lines(tmp_path):
    r = moi("--local", "--input", str(audio_file("speech_with_clatter_16k.wav")), "--pipeline", "transcribe", "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert all("type" in e and "t" in e for e in events)
    texts = [e["text"] for e in events if e["type"] == "transcript"]
    assert "dublin" in words(" ".join(texts)) and "philosophy" in words(" ".join(texts))
    assert sum(e["type"] == "meter" for e in events) > 400


def test_chat_on_the_sample_prints_you_and_moi_and_saves_the_reply(tmp_path):
    out = tmp_path / "reply.wav"
    r = moi("--local", "--input", "sample", "--save-reply", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    you = [l for l in lines if l.startswith("you: ")]
    me = [l for l in lines if l.startswith("moi: ")]
    assert you and len(me) == len(you)
    assert "dublin" in words(you[0])
    assert any("end of speech → first audio" in l for l in lines)
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24_000 and w.getnchannels() == 1 and w.getnframes() > 24_000


def test_the_echo_pipeline_speaks_with_kokoro_when_asked(tmp_path, stt):
    """``--tts kokoro-int8``: the same pipeline in Kokoro's voice; what it says back is what
    Whisper heard."""
    out = tmp_path / "echo.wav"
    r = moi("--local", "--input", "sample", "--pipeline", "echo", "--tts", "kokoro-int8", "--save-reply", str(out))
    assert r.returncode == 0, r.stderr
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24_000
    # Whole words, not one name: tiny.en hears Piper's "Dublin" as "double in" in most draws
    # (Piper draws its timing at random), while 85-95 % of the words come back in every draw;
    # Kokoro's offline voices are Japanese, and lose some too.
    heard = words(" ".join(l[5:] for l in r.stdout.splitlines() if l.startswith("you: ")))
    echoed = words(stt.transcribe(decode(out)).text)
    assert len(heard) > 10 and len(heard & echoed) >= 0.7 * len(heard), (heard, echoed)
    bad = moi("--local", "--input", "sample", "--tts", "piper-nope")
    assert bad.returncode != 0 and "unknown model 'piper-nope'" in bad.stderr


def test_no_speech_is_said_and_is_not_a_failure(tmp_path):
    path = tmp_path / "hum.wav"
    t = np.arange(3 * SPEECH_RATE) / SPEECH_RATE
    Audio((0.2 * np.sin(2 * np.pi * 50 * t)).astype(np.float32), SPEECH_RATE).save_wav(path)
    r = moi("--input", str(path), "--pipeline", "transcribe")
    assert r.returncode == 0 and "no speech found" in r.stderr


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, I am a text file\n" * 10), "not a readable audio file"),
        (lambda p: Audio(np.zeros(0, np.float32), SPEECH_RATE).save_wav(p), "no audio samples"),
        (lambda p: None, "no such file"),
    ],
    ids=["empty", "text-as-wav", "zero-samples", "missing"],
)
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(tmp_path, make, message):
    path = tmp_path / "input.wav"
    make(path)
    r = moi("--input", str(path))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_bad_options_exit_nonzero():
    r = moi("--input", "sample", "--pipeline", "karaoke")
    assert r.returncode == 2 and "unknown pipeline" in r.stderr
    r = moi("--input", "sample", "--output", "reply.mp3")
    assert r.returncode == 2 and "--output takes 'speaker' or a .wav path" in r.stderr
    env_bad = subprocess.run(
        [sys.executable, "-m", "local.cli", "--input", "sample"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "MOI_LLM_MAX_TOKENS": "lots"},
    )
    assert env_bad.returncode == 2 and "MOI_LLM_MAX_TOKENS='lots'" in env_bad.stderr
    for args in (["--input", "sample"], ["ui", "--lazy"]):  # a typo must not mean "no canceller"
        typo = subprocess.run(
            [sys.executable, "-m", "local.cli", *args], cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, "MOI_ECHO_CANCELLER": "webrtc"}, timeout=60,
        )
        assert typo.returncode == 2 and "unknown echo canceller 'webrtc' (MOI_ECHO_CANCELLER)" in typo.stderr, typo.stderr


def test_stereo_8khz_input_works(tmp_path):
    src = decode(audio_file("speech_60s_16k.wav")).slice(0, 8).resample(8000)
    pcm = (np.clip(src.samples, -1, 1) * 32767).astype("<i2")
    path = tmp_path / "stereo8k.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.repeat(pcm, 2).tobytes())
    r = moi("--input", str(path), "--pipeline", "transcribe")
    assert r.returncode == 0, r.stderr
    assert "dublin" in words(r.stdout)


def test_long_utterance_is_flushed_at_the_maximum():
    env = {**os.environ, "MOI_VAD_MAX_UTTERANCE_S": "4"}
    r = subprocess.run(
        [sys.executable, "-m", "local.cli", "--input", str(audio_file("speech_60s_16k.wav")), "--pipeline",
         "transcribe", "--json", "--no-meters"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    ends = [e for e in map(json.loads, r.stdout.splitlines()) if e["type"] == "speech_end"]
    assert any(e["forced"] for e in ends)
    assert all(e["seconds"] <= 4.0 + 0.04 for e in ends)


def test_models_lists_every_role():
    r = moi("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["role"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"vad", "stt", "llm", "tts", "turn"}
    assert all(row["source"].startswith("pack:") and row["size_mb"] > 1 for row in rows.values())


def test_error_lines_keep_brackets_from_library_and_user_text(capsys):
    """Rich markup is escaped in every message with outside text: `moi[modal]` stays as typed."""
    from local import cli

    cli.fail("pip install 'moi[modal]' for [bold]this[/bold]")
    err = capsys.readouterr().err
    assert "pip install 'moi[modal]' for [bold]this[/bold]" in err
