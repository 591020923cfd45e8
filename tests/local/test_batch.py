"""`moi transcribe` over folders of real recordings, with the real models: outputs, resume, fan-out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from itertools import pairwise
from pathlib import Path

import jiwer
import pytest
import srt
import webvtt

from local.batch import BatchModels, BatchOptions, modal_mapper, plan_batch, run_batch
from cloud.longform import FileOptions, speech_windows, transcribe_one
from local.transcripts import MANIFEST_NAME, TEMP_SUFFIX
from shared.audio import decode
from shared.config import VadConfig
from shared.errors import ConfigError
from shared.text import spoken_words
from tests.conftest import ROOT, audio_file, words

# The command as a user runs it. Once local/cli.py registers it: [-m, local.cli, transcribe].
CLI = [sys.executable, "-m", "local.cli", "transcribe"]
FORMATS = ("txt", "srt", "vtt", "json")

GOOD = {  # key (path under the tree) -> handout
    "lectures/2024/speech_60s_16k.wav": "speech_60s_16k.wav",
    "lectures/comfyui_hotword.mp3": "comfyui_hotword.mp3",
    "stereo/two_speakers_stereo_5s.wav": "two_speakers_stereo_5s.wav",
}
BAD = {  # key -> the reason moi must give
    "bad/not_audio.wav": "not a readable audio file",
    "bad/empty.mp3": "empty file (0 bytes)",
    "bad/truncated.mp3": "not a readable audio file",
    "bad/zero.wav": "contains no audio samples",
}


def moi(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [*CLI, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def make_bad(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "not_audio.wav").write_text("hello, I am a text file\n" * 10)
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "truncated.mp3").write_bytes(audio_file("comfyui_hotword.mp3").read_bytes()[:200])
    with wave.open(str(folder / "zero.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(b"")


def _vtt_seconds(stamp: str) -> float:  # webvtt-py's start_in_seconds drops the milliseconds
    h, m, sec = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def outputs(root: Path, key: str) -> dict[str, Path]:
    base = root / Path(key).with_suffix("")
    return {f: base.with_name(f"{base.name}.{f}") for f in FORMATS}


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())["files"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("recordings")
    for key, handout in GOOD.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(audio_file(handout), src / key)
    make_bad(src / "bad")
    return src


@pytest.fixture(scope="module")
def first_run(tree, tmp_path_factory):
    """One real run over the whole tree with two worker processes; every test reads it."""
    out = tmp_path_factory.mktemp("transcripts")
    t = time.perf_counter()
    r = moi(tree, "--recursive", "--output-dir", out, "--jobs", 2, "--format", ",".join(FORMATS))
    return r, out, time.perf_counter() - t


def test_outputs_mirror_the_tree_in_every_format(first_run):
    r, out, _ = first_run
    expected = {p for key in GOOD for p in outputs(out, key).values()} | {out / MANIFEST_NAME}
    written = {p for p in out.rglob("*") if p.is_file()}
    assert written == expected, r.stderr  # nothing for bad files, no temp files left over
    files = manifest(out)
    assert {k for k, e in files.items() if e["status"] == "done"} == set(GOOD)
    for key in GOOD:
        assert files[key]["transcriptions"] == 1
        assert files[key]["duration_s"] > 0 and files[key]["processing_s"] > 0 and files[key]["rtf"] > 0


def test_srt_and_vtt_parse_and_every_time_is_inside_the_file(first_run, tree):
    _, out, _ = first_run
    for key in GOOD:
        duration = decode(tree / key).seconds
        paths = outputs(out, key)
        doc = json.loads(paths["json"].read_text())
        assert doc["duration"] == pytest.approx(duration, abs=0.01)
        segments = [s for s in doc["segments"] if s["text"].strip()]
        subs = list(srt.parse(paths["srt"].read_text()))
        cues = webvtt.read(str(paths["vtt"]))
        assert len(subs) == len(cues) == len(segments)
        starts = [s.start.total_seconds() for s in subs]
        assert starts == sorted(starts)
        assert [_vtt_seconds(c.start) for c in cues] == pytest.approx(starts, abs=0.002)
        for sub in subs:
            assert 0 <= sub.start.total_seconds() <= sub.end.total_seconds() <= duration + 0.001
        word_starts = [w["start"] for s in doc["segments"] for w in s["words"]]
        assert word_starts == sorted(word_starts)
        for s in doc["segments"]:
            for w in s["words"]:
                assert 0 <= w["start"] <= w["end"] <= duration


def test_the_recordings_words_are_there_on_the_files_clock(first_run):
    _, out, _ = first_run
    lecture = outputs(out, "lectures/2024/speech_60s_16k.wav")
    heard = words(lecture["txt"].read_text())
    assert {"dublin", "philosophy", "piketty"} <= heard or {"dublin", "philosophy"} <= heard
    doc = json.loads(lecture["json"].read_text())
    assert doc["language"] == "en" and doc["model"] and doc["source"] == "lectures/2024/speech_60s_16k.wav"
    # the lecture is longer than one Whisper window: times from later windows are shifted onto the file
    assert doc["segments"][-1]["start"] > 40
    tax = [w for s in doc["segments"] for w in s["words"] if "wealth" in w["word"].lower()]
    assert tax and all(30 < w["start"] < 60 for w in tax)  # "global wealth tax" is said after 30 s
    assert "comfy" in outputs(out, "lectures/comfyui_hotword.mp3")["txt"].read_text().lower()


def test_bad_files_are_named_with_their_reason_and_exit_1(first_run):
    r, out, _ = first_run
    assert r.returncode == 1
    files = manifest(out)
    for key, reason in BAD.items():
        assert f"{key}: {reason}" in r.stderr
        assert files[key]["status"] == "failed" and reason in files[key]["reason"]
        assert not any(p.exists() for p in outputs(out, key).values())


def test_a_rerun_skips_everything_done(first_run, tree):
    _, out, first_s = first_run
    before = {p: p.stat().st_mtime_ns for key in GOOD for p in outputs(out, key).values()}
    counts = {k: e["transcriptions"] for k, e in manifest(out).items()}
    t = time.perf_counter()
    r = moi(tree, "--recursive", "--output-dir", out, "--jobs", 1)
    took = time.perf_counter() - t
    assert r.returncode == 1  # the bad files are tried again and fail again
    assert f"{len(GOOD)} already done" in r.stderr
    files = manifest(out)
    assert all(files[k]["status"] == "skipped" for k in GOOD)
    assert {k: e["transcriptions"] for k, e in files.items()} == counts
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert took < first_s  # only the four bad files were opened


def test_force_redoes_the_done_files(first_run, tree):
    _, out, _ = first_run
    lecture_json = outputs(out, "lectures/2024/speech_60s_16k.wav")["json"]
    before_ns = lecture_json.stat().st_mtime_ns
    counts = {k: manifest(out)[k]["transcriptions"] for k in GOOD}
    r = moi(tree, "--recursive", "--output-dir", out, "--jobs", 1, "--force")
    assert r.returncode == 1, r.stderr
    files = manifest(out)
    assert all(files[k]["status"] == "done" and files[k]["transcriptions"] == counts[k] + 1 for k in GOOD)
    assert lecture_json.stat().st_mtime_ns > before_ns
    assert "dublin" in words(json.loads(lecture_json.read_text())["text"])


def test_usage_errors_exit_2_with_one_line(tmp_path):
    r = moi(tmp_path / "nope")
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    r = moi(tmp_path, "--format", "txt,docx")
    assert r.returncode == 2 and "unknown format docx" in r.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env |= {"MODAL_CONFIG_PATH": str(tmp_path / "no-modal.toml"), "COLUMNS": "200"}
    r = subprocess.run([*CLI, str(tmp_path), "--remote"], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "modal token new" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _session_alive(sid: int) -> list[int]:
    """Pids still running in session ``sid`` (the killed run's orphaned workers, if any)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find orphaned workers")
def test_kill_9_then_rerun_does_every_file_exactly_once(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    speech = decode(audio_file("speech_60s_16k.wav"))
    for i, (a, b) in enumerate([(0, 20), (20, 40), (40, 60)]):
        speech.slice(a, b).save_wav(src / f"part{i}" / f"lecture_{i}.wav")
    shutil.copy(audio_file("comfyui_hotword.mp3"), src / "comfyui_hotword.mp3")
    shutil.copy(audio_file("two_speakers_stereo_5s.wav"), src / "part1" / "stereo.wav")
    keys = {p.relative_to(src).as_posix() for p in src.rglob("*.*")}

    run = subprocess.Popen(
        [*CLI, str(src), "-r", "-o", str(out), "-j", "1"], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.poll() is None:
        try:
            if any(e["status"] == "done" for e in manifest(out).values()):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    first = {k for k, e in manifest(out).items() if e["status"] == "done"}
    assert first and first < keys
    for _ in range(50):  # its worker process notices and exits too
        if not _session_alive(run.pid):
            break
        time.sleep(0.1)
    assert not _session_alive(run.pid)
    # what a kill during a write leaves: a hidden temp file of the dead process
    stale = out / f".lecture_0.srt.{run.pid}{TEMP_SUFFIX}"
    stale.write_text("1\n00:00:00,000 --> 00:00:0")

    r = moi(src, "-r", "-o", out, "-j", 1)
    assert r.returncode == 0, r.stderr
    files = manifest(out)
    assert set(files) == keys
    second = {k for k, e in files.items() if e["status"] == "done"}
    assert first.isdisjoint(second) and first | second == keys  # each file done by exactly one run
    assert {k for k, e in files.items() if e["status"] == "skipped"} == first
    assert all(e["transcriptions"] == 1 for e in files.values())
    assert not [p for p in out.rglob(".*")]  # no temp file, stale or new
    for key in keys:
        paths = outputs(out, key)
        assert all(p.exists() for p in paths.values())
        json.loads(paths["json"].read_text())
        list(srt.parse(paths["srt"].read_text()))


# --- the remote fan-out driver, in process ---------------------------------------------------


class LocalStarmap:
    """Modal's ``method.starmap`` contract over a local call: unordered, exceptions as values.

    Not a model fake: every input goes to the real ``transcribe_one`` with the real models,
    except those named in ``lose``, which come back as the exception Modal would return.
    """

    def __init__(self, models: BatchModels, lose: tuple[str, ...] = ()) -> None:
        self.models, self.lose, self.sent = models, lose, []

    def starmap(self, inputs, *, order_outputs=True, return_exceptions=False):
        assert order_outputs is False and return_exceptions is True
        results = []
        for name, data, options in inputs:
            self.sent.append((name, type(data), options))
            if any(name.endswith(x) for x in self.lose):
                results.append(RuntimeError("container preempted"))
            else:
                results.append(transcribe_one(name, data, options, self.models))
        return reversed(results)  # not in input order


@pytest.fixture(scope="module")
def batch_models(stt, vad_model) -> BatchModels:
    return BatchModels(stt, vad_model, VadConfig())


def test_remote_fan_out_writes_results_as_they_arrive(tmp_path, batch_models):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    shutil.copy(audio_file("comfyui_hotword.mp3"), src / "sub" / "comfy.mp3")
    shutil.copy(audio_file("two_speakers_stereo_5s.wav"), src / "stereo.wav")
    make_bad(src / "bad")
    plan = plan_batch([src], BatchOptions(("txt", "srt", "json"), out, recursive=True))
    remote = LocalStarmap(batch_models, lose=("stereo.wav",))
    seen = []

    def on_file(outcome):
        seen.append(outcome.key)
        if outcome.status == "done":  # written before the next result is taken
            assert (out / "sub" / "comfy.json").exists()

    report = run_batch(plan, modal_mapper(remote), on_file)
    assert all(kind is bytes for _, kind, _ in remote.sent)  # files travel as bytes
    assert all(isinstance(opts, dict) for _, _, opts in remote.sent)  # options as plain dicts
    assert seen == [name for name, _, _ in reversed(remote.sent)]
    status = {o.key: (o.status, o.reason) for o in report.outcomes}
    assert status["sub/comfy.mp3"] == ("done", None)
    assert status["stereo.wav"] == ("failed", "RuntimeError: container preempted")
    assert status["bad/empty.mp3"] == ("failed", "empty input (0 bytes)")
    assert status["bad/not_audio.wav"][1].startswith("not a readable audio file")
    assert report.exit_code == 1
    assert "comfy" in (out / "sub" / "comfy.txt").read_text().lower()
    assert manifest(out)["sub/comfy.mp3"]["transcriptions"] == 1


def test_remote_refuses_files_over_the_size_limit(tmp_path, batch_models):
    src = tmp_path / "src"
    make_bad(src)
    plan = plan_batch([src], BatchOptions(("txt",), tmp_path / "out"))
    remote = LocalStarmap(batch_models)
    report = run_batch(plan, modal_mapper(remote, max_bytes=100))
    sent = {name for name, _, _ in remote.sent}
    assert sent == {"empty.mp3", "zero.wav"}  # 0 and 44 bytes; the others are over 100
    reasons = {o.key: o.reason for o in report.outcomes}
    assert "MB sent to Modal per file" in reasons["truncated.mp3"] and "--local" in reasons["not_audio.wav"]


# --- pieces -----------------------------------------------------------------------------------


def test_speech_windows_fit_whisper_and_cover_the_speech(speech60, vad_model):
    windows = speech_windows(speech60, vad_model, VadConfig(max_utterance_s=29.0), max_gap_s=3.0)
    assert len(windows) >= 3  # 60 s of lecture cannot go in two 29 s windows
    assert all(0 <= a < b <= 60.0 and b - a <= 29.0 + 0.04 for a, b in windows)
    assert all(b1 <= a2 for (_, b1), (a2, _) in pairwise(windows))
    assert sum(b - a for a, b in windows) > 45  # a lecture is mostly speech


REFERENCE = json.loads(audio_file("transcripts.json").read_text())


def _wer(reference: str, heard: str) -> float:
    return jiwer.wer(" ".join(spoken_words(reference)), " ".join(spoken_words(heard)))


@pytest.mark.parametrize(("rate", "before"), [(16_000, 0.026), (8_000, 0.034)])
def test_batched_windows_keep_the_words_of_the_lecture(speech60, batch_models, rate, before):
    """Batched decoding is no worse than one window after another was (its WER against the
    reference, measured when batch went batched, is ``before``): at 16 kHz and as a phone-rate WAV."""
    audio = speech60.resample(rate)
    result = transcribe_one("lecture.wav", audio.to_wav(), FileOptions(), batch_models)
    assert result["windows"] >= 3
    assert _wer(REFERENCE["speech_60s_16k.wav"], result["text"]) <= before, result["text"]


def test_cues_are_cut_at_sentences_pauses_and_length(speech60, batch_models):
    result = transcribe_one("lecture.wav", speech60.to_wav(), FileOptions(), batch_models)
    cues = result["segments"]
    assert len(cues) > result["windows"]  # a 29 s window is never one subtitle
    for cue in cues:
        assert cue["words"] and len(cue["text"]) <= 84 and cue["end"] - cue["start"] <= 7.0 + 0.5, cue
        assert spoken_words(cue["text"]) == spoken_words(" ".join(w["word"] for w in cue["words"]))  # words = text
        assert cue["start"] == cue["words"][0]["start"] and cue["end"] == cue["words"][-1]["end"]
    assert any(c["text"].endswith("Dublin?") for c in cues)  # a question ends its cue
    assert [c["start"] for c in cues] == sorted(c["start"] for c in cues)


def test_plain_text_needs_no_word_times(speech60, batch_models):
    """txt alone skips the alignment pass: one segment per window, the same words."""
    plain = transcribe_one("lecture.wav", speech60.to_wav(), FileOptions(word_timestamps=False), batch_models)
    assert len(plain["segments"]) == plain["windows"] and not any(s["words"] for s in plain["segments"])
    assert _wer(REFERENCE["speech_60s_16k.wav"], plain["text"]) <= 0.026


def test_one_file_gets_one_worker_with_every_core(tmp_path):
    shutil.copy(audio_file("comfyui_hotword.mp3"), tmp_path / "a.mp3")
    r = moi(tmp_path / "a.mp3", "-f", "txt", "-o", tmp_path / "out")
    assert r.returncode == 0 and "to transcribe on 1 worker" in r.stderr, r.stderr


def test_plan_keeps_side_by_side_names_apart_and_refuses_real_clashes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        shutil.copy(audio_file("comfyui_hotword.mp3"), folder / "a.mp3")
    shutil.copy(audio_file("two_speakers_stereo_5s.wav"), one / "a.wav")
    plan = plan_batch([one], BatchOptions(("srt",)))
    assert sorted(j.outputs(("srt",))["srt"].name for j in plan.todo) == ["a.mp3.srt", "a.wav.srt"]
    assert plan.manifest == one.resolve() / MANIFEST_NAME
    plan = plan_batch([one, two], BatchOptions(("srt",)))  # next to each input: no clash
    assert {j.key for j in plan.todo} == {"one/a.mp3", "one/a.wav", "two/a.mp3"}
    with pytest.raises(ConfigError, match="would write the same transcripts"):
        plan_batch([one / "a.mp3", two / "a.mp3"], BatchOptions(("srt",), tmp_path / "out"))


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unwritable_output_folder_is_one_line_and_exit_2(tmp_path, where):
    """It printed a 63-line traceback: now one line, before any work, and nothing is lost."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(audio_file("comfyui_hotword.mp3"), src / "a.mp3")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out" if where == "file" else Path("/proc/moi-out")  # root can write anywhere else
    r = subprocess.run([*CLI, str(src), "-o", str(out)], cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**os.environ, "COLUMNS": "200"})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("moi: error: cannot write transcripts to") and "Traceback" not in r.stderr
    assert sorted(p.name for p in src.iterdir()) == ["a.mp3"]
