"""modal_app.py without a Modal account: import, settings, and every GPU method run in-process
through Modal's local-call API on the offline models."""

import os
import subprocess
import sys

import modal
import pytest

from shared.audio import Audio
from tests.conftest import ROOT, words

modal_app = pytest.importorskip("modal_app")


def test_imports_without_credentials_or_network():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["HOME"] = "/nonexistent"  # no ~/.modal.toml either
    code = "import modal_app, modal; assert isinstance(modal_app.app, modal.App); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_declares_gpu_classes_that_scale_to_zero_with_snapshots():
    for cls in (modal_app.Transcriber, modal_app.Chatter, modal_app.Speaker):
        assert isinstance(cls, modal.Cls)
    assert isinstance(modal_app.web, modal.Function)
    opts = modal_app._gpu_class
    assert opts["gpu"] == modal_app.GPU == "L4"
    assert opts["enable_memory_snapshot"] is True
    assert opts["experimental_options"] == {"enable_gpu_snapshot": True}
    assert 2 <= opts["scaledown_window"] <= 3600
    assert "min_containers" not in opts  # scale to zero


def test_gpu_is_configurable_at_deploy_time():
    env = {**os.environ, "MOI_MODAL_GPU": "A10G,L4", "MOI_MODAL_SCALEDOWN": "60"}
    code = "import modal_app; print(modal_app.GPU, modal_app._gpu_class['scaledown_window'])"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "['A10G', 'L4'] 60", r.stderr


def test_remote_without_a_token_fails_clearly():
    with pytest.raises(Exception) as info:
        modal_app.Transcriber().transcribe.remote(b"\x00\x00" * 1600)
    assert type(info.value).__module__.startswith("modal")


def test_transcriber_runs_locally(speech60):
    clip = speech60.slice(0, 7)
    result = modal_app.Transcriber().transcribe.local(clip.to_pcm16(), 16_000)
    assert {"dublin", "answer"} <= words(result.text)
    out = modal_app.Transcriber().transcribe_file.local("bad.wav", b"not audio at all")
    assert "error" in out and "bad.wav" in out["error"]["message"]
    good = modal_app.Transcriber().transcribe_file.local("clip.wav", clip.to_wav())
    assert "dublin" in words(good["text"])


def test_chatter_streams_locally():
    pieces = list(modal_app.Chatter().chat.local([("system", "Be brief."), ("user", "Say hello.")], 12))
    assert len(pieces) > 1 and "".join(pieces).strip()


def test_speaker_streams_sentences_locally(stt):
    out = list(modal_app.Speaker().speak.local("Hello there. The weather is lovely today."))
    assert [p for p, _, _ in out] == ["Hello there.", "The weather is lovely today."]
    audio = Audio.from_pcm16(out[1][1], out[1][2])
    assert {"weather", "lovely"} <= words(stt.transcribe(audio).text)
