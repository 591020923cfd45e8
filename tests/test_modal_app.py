"""modal_app.py without a Modal account: import, settings, the build context of each image
step, and every GPU method run in-process through Modal's local-call API on the offline models."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import modal
import pytest

from shared.audio import Audio
from shared.errors import EngineError
from shared.engine import TurnRequest
from shared.messages import ChatOptions, Message
from tests.conftest import ROOT, said_back, words

modal_app = pytest.importorskip("modal_app")


def test_imports_without_credentials_or_network():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["HOME"] = "/nonexistent"  # no ~/.modal.toml either
    code = "import modal_app, modal; assert isinstance(modal_app.app, modal.App); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_declares_gpu_classes_that_scale_to_zero_with_snapshots():
    for cls in (modal_app.Transcriber, modal_app.Voice):
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
        modal_app.Transcriber().transcribe_file.remote("a.wav", b"\x00\x00" * 1600)
    assert type(info.value).__module__.startswith("modal")


def test_transcriber_runs_locally(speech60):
    clip = speech60.slice(0, 7)
    out = modal_app.Transcriber(device="cpu").transcribe_file.local("bad.wav", b"not audio at all")
    assert "error" in out and "bad.wav" in out["error"]["message"]
    good = modal_app.Transcriber(device="cpu").transcribe_file.local("clip.wav", clip.to_wav())
    assert "dublin" in words(good["text"])


@pytest.fixture(scope="module")
def voice():
    return modal_app.Voice(device="cpu")


def test_voice_transcribes_locally(voice, speech60):
    result = voice.transcribe.local(speech60.slice(0, 7).to_pcm16(), 16_000)
    assert {"dublin", "answer"} <= words(result.text)


def test_voice_streams_chat_locally(voice):
    pieces = list(voice.chat.local([("system", "Be brief."), ("user", "Say hello.")], 12))
    assert len(pieces) > 1 and "".join(pieces).strip()


def test_voice_runs_a_whole_turn_in_one_call(voice, speech60, stt):
    """The conversation's one GPU container: an utterance in, the turn's events out, the model
    that answered named in turn_done."""
    from shared.engine import TurnRequest
    from shared.events import ReplyAudio, ReplyText, Transcript, TurnDone

    request = TurnRequest((Message("system", "Be brief."),), ChatOptions(max_tokens=16), turn=3)
    events = list(voice.turn.local(speech60.slice(0.0, 2.3).to_pcm16(), 16_000, request))
    assert isinstance(events[0], Transcript) and "dublin" in words(events[0].text)
    assert isinstance(events[-1], TurnDone) and events[-1].engine == "modal · SmolLM2-135M-Instruct Q8_0"
    reply = next(e for e in events if isinstance(e, ReplyText)).text
    audio = Audio.concat([e.audio for e in events if isinstance(e, ReplyAudio)])
    assert reply and all(e.turn == 3 for e in events)
    assert words(reply) & words(stt.transcribe(audio).text)  # the reply, spoken


def test_voice_speaks_sentences_locally(voice, stt):
    out = list(voice.speak.local("Hello there. The weather is lovely today."))
    assert [p for p, _, _ in out] == ["Hello there.", "The weather is lovely today."]
    audio = Audio.from_pcm16(out[1][1], out[1][2])
    assert said_back("The weather is lovely today.", stt.transcribe(audio).text)


def test_voice_speaks_a_piece_whole_when_told(voice):
    out = list(voice.speak.local("Well, hello there, my friend.", None, None, False))
    assert [p for p, _, _ in out] == ["Well, hello there, my friend."]


@pytest.mark.parametrize("cls", ["Transcriber", "Voice"])
def test_gpu_classes_refuse_to_serve_from_the_cpu(cls):
    """Configured for CUDA (the default), a class whose model lands on the CPU fails loudly at
    load instead of answering slowly while the GPU is billed."""
    with pytest.raises(EngineError, match="loaded on cpu, but this runner must use cuda"):
        if cls == "Transcriber":
            modal_app.Transcriber().transcribe_file.local("a.wav", b"\x00\x00" * 1600)
        else:
            modal_app.Voice().transcribe.local(b"\x00\x00" * 1600)


BUILD_CHECK = """
import sys
# the editable install would find the project's packages anywhere: this check must not see them
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import modal_app
for name in ("download_stt", "download_voice"):
    assert callable(getattr(modal_app, name)), name
from shared.models import resolve  # what the download functions import when they run
assert "cloud" not in sys.modules and "local" not in sys.modules, sorted(sys.modules)
try:
    import cloud
except ImportError:
    print("ok")
"""


def test_each_image_build_step_finds_what_modal_app_imports(tmp_path):
    """`run_function` imports modal_app.py in a build container holding only that file plus what
    the image has so far: here, modal_app.py and shared/ (copied in before the downloads), and no
    cloud/ or local/. Importing it and resolving the download functions must work there."""
    shutil.copy(ROOT / "modal_app.py", tmp_path / "modal_app.py")
    shutil.copytree(ROOT / "shared", tmp_path / "shared", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", BUILD_CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def imports(path):
    return set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), flags=re.MULTILINE))


def test_imports_run_one_way():
    """shared ← cloud ← local; modal_app.py imports only cloud/ and shared/; nothing imports it."""
    assert not {m for m in imports(ROOT / "modal_app.py") if m.split(".")[0] == "local"}
    for package, banned in (("shared", {"cloud", "local", "modal_app"}), ("cloud", {"local", "modal_app"}),
                            ("local", {"modal_app"})):
        for path in (ROOT / package).glob("*.py"):
            bad = {m for m in imports(path) if m.split(".")[0] in banned}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_import_cycles_among_the_modules():
    """Every import among shared/, cloud/ and local/ (function-level ones too) runs one way: no
    module reaches itself again."""
    graph = {}
    for package in ("shared", "cloud", "local"):
        for path in (ROOT / package).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            graph[name] = {m for m in imports(path) if m.split(".")[0] in ("shared", "cloud", "local")}
    graph = {name: deps & graph.keys() - {name} for name, deps in graph.items()}

    def reaches(start, node, seen):
        for dep in graph[node]:
            if dep == start:
                return True
            if dep not in seen:
                seen.add(dep)
                if reaches(start, dep, seen):
                    return True
        return False

    assert not [name for name in graph if reaches(name, name, set())]


class FakeStops(dict):
    """Not a model: modal.Dict's put/contains in this process (the double of the Modal call)."""

    def put(self, key, value):
        self[key] = value

    def contains(self, key):
        return key in self


@pytest.fixture()
def stops(monkeypatch):
    fake = FakeStops()
    monkeypatch.setattr(modal_app, "STOPS", fake)
    return fake


def test_stop_ends_a_streamed_chat_in_the_container_within_one_token(stops, voice):
    """Closing a remote stream does not stop a Modal generator, so Stop travels as a flag the
    container polls: once it is seen, at most the token in flight comes out."""
    tokens = voice.chat.local(
        [("user", "Tell me a long story about a dragon who learns to cook.")], 300, stop_key="turn-1"
    )
    assert len([next(tokens) for _ in range(3)]) == 3
    stops.put("turn-1", True)  # what ModalEngine does on Stop
    time.sleep(10 * modal_app.STOP_POLL_S)  # the container's watcher has seen it by now
    assert len(list(tokens)) <= 1


def test_the_engine_flags_a_stream_left_early_and_only_then(stops, voice):
    engine = modal_app.ModalEngine(voice, local=True)
    whole = list(engine.chat([Message("user", "Say hello.")], options=ChatOptions(max_tokens=8)))
    assert whole and not stops  # a stream that ran to its end needs no stop
    cancel = threading.Event()
    stream = engine.chat([Message("user", "Tell me a long story.")], options=ChatOptions(max_tokens=300), cancel=cancel)
    next(stream)
    cancel.set()  # Stop
    assert list(stream) == [] and len(stops) == 1
    spoken = engine.speak("One two three. Four five six. Seven eight nine.")
    next(spoken)
    spoken.close()  # the consumer goes away mid-reply
    assert len(stops) == 2
    cancel = threading.Event()  # a turn stopped mid-reply: one key for the whole turn
    turn = engine.turn(Audio.silence(0.2), TurnRequest(options=ChatOptions(max_tokens=300), text="Tell me a long story."),
                       cancel=cancel)
    next(turn)
    cancel.set()
    assert len(list(turn)) <= 1 and len(stops) == 3


def test_the_chat_model_is_chosen_at_deploy_time():
    """MOI_MODAL_LLM picks the model baked into the Voice image; it travels in the images'
    environment (MOI_LLM_MODEL), where the build step and the containers read it back."""
    env = {**os.environ, "MOI_MODAL_LLM": "HuggingFaceTB/SmolLM2-360M-Instruct"}
    code = "import modal_app; print(modal_app.LLM_MODEL, modal_app._hub_env['MOI_LLM_MODEL'])"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["HuggingFaceTB/SmolLM2-360M-Instruct"] * 2, r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("MOI_MODAL_LLM", "MOI_LLM_MODEL")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["HuggingFaceTB/SmolLM2-135M-Instruct"] * 2, r.stderr
