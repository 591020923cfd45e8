"""A live session without a sound card: files played in real time.

No hang, ever: a turn that raises anything becomes an error line, the session goes on with the
next utterance, and Ctrl-C still ends it. Speech in a played file is queued while moi answers
(half-duplex is for a microphone that hears the speaker).
"""

import queue
import signal
import subprocess
import sys
import threading
import time
from itertools import chain, repeat

import pytest

from cloud.engine import LocalEngine
from cloud.vad import Segmenter
from cloud.live import LiveSession
from cloud.pipeline import Pipeline, file_source
from local.run import paced
from local.web_hub import BrowserPlayback
from shared.audio import Audio
from shared.config import Config
from shared.events import Dropped, ReplyAudio, ReplyText, SpeechStarted, Transcript, TurnDone
from shared.models import resolve
from tests.conftest import ROOT, words


def test_a_turn_that_raises_is_shown_the_next_is_answered_and_ctrl_c_ends_it(speech60, tmp_path):
    two = tmp_path / "two.wav"
    Audio.concat([Audio.silence(0.5), speech60.slice(0.0, 2.3), Audio.silence(1.5), speech60.slice(2.4, 7.1),
                  Audio.silence(1.5)]).save_wav(two)
    proc = subprocess.Popen([sys.executable, "tests/faulty_session.py", str(two)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if line.startswith("moi:"):  # the second utterance was answered
                break
        assert any(line.startswith("moi:") for line in out), (out, proc.poll())
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "turn 1 failed:" in err and "KeyError: 'segments'" in err, err
    assert "Traceback" not in err, err
    assert "exit 1" in rest and proc.returncode == 1
    you = [line for line in out if line.startswith("you:")]
    assert len(you) == 1 and "answer" in you[0].lower()  # turn 2's words; turn 1 never got a transcript


@pytest.mark.parametrize("hears_player", [False, True])
def test_speech_in_a_played_file_waits_its_turn(runners, vad_model, speech60, tmp_path, hears_player):
    """The question, then the same question again 0.25 s later, while moi prepares its answer to
    the first on speculation (its reply would play in real time). Nothing of moi was heard yet,
    so the person went on: that answer is dropped and both are one turn, answered once (from a
    file, and from a microphone near the speaker alike: no reply is talked over, nothing is
    dropped). The pause, with the clip's own quiet end, is well under the VAD's 0.5 s: a turn
    that ends there has its reply, prepared on speculation, playing ~0.15 s later, and a
    question that starts again 0.4 s after the last word (0.5 s of quiet) lands on it."""
    cfg = Config.load(env={}, llm__max_tokens=24)
    q = speech60.slice(0.0, 2.3)
    path = tmp_path / "twice.wav"
    Audio.concat([Audio.silence(0.5), q, Audio.silence(0.25), q, Audio.silence(0.5)]).save_wav(path)
    source = paced(chain(file_source(path), repeat(Audio.silence(0.1))))  # then a quiet room
    pipe = Pipeline(LocalEngine(cfg, runners), Segmenter(vad_model, cfg.vad), cfg, "chat")
    player = BrowserPlayback()  # keeps the reply's playing time, in real time
    live = LiveSession(pipe, source, player, barge_in="half", hears_player=hears_player).start()
    events, deadline, idle_since = [], time.monotonic() + 240, None
    try:
        while time.monotonic() < deadline:
            try:
                ev = live.events.get(timeout=0.2)
                if ev is None:
                    break
                events.append(ev)
            except queue.Empty:
                pass
            replies = sum(isinstance(e, ReplyText) for e in events)
            if replies >= 2:
                break
            if replies == 1 and not live.answering:  # the first turn is over, its reply played
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 2.0:
                    break  # nothing else was queued
            else:
                idle_since = None
    finally:
        live.close()
    heard = [e.text for e in events if isinstance(e, Transcript)]
    replies = [e for e in events if isinstance(e, ReplyText)]
    assert all("dublin" in words(h) for h in heard), heard
    assert heard[-1].lower().count("dublin") == 2, heard  # both questions, one turn
    assert [r.turn for r in replies] == [max(e.turn for e in events if isinstance(e, Transcript))], replies
    assert not [e for e in events if isinstance(e, Dropped)]


def test_when_a_played_file_ends_its_last_turn_is_still_answered(runners, vad_model, speech60):
    """The file ends right after the question: the session answers it before it ends (it used
    to cut that turn after its first event), then says it is over."""
    cfg = Config.load(env={}, llm__max_tokens=16)
    source = paced(file_source_of(Audio.concat([Audio.silence(0.5), speech60.slice(0.0, 2.3), Audio.silence(0.7)])))
    pipe = Pipeline(LocalEngine(cfg, runners), Segmenter(vad_model, cfg.vad), cfg, "chat")
    live = LiveSession(pipe, source, None, hears_player=False).start()
    assert live.wait(180), "the session did not end after its source"
    events = []
    while (ev := live.events.get(timeout=5)) is not None:
        events.append(ev)
    live.close()
    replies = [e for e in events if isinstance(e, ReplyText)]
    assert len(replies) == 1 and replies[0].text and not replies[0].cancelled


def file_source_of(audio, chunk_s=0.1):
    step = int(chunk_s * audio.sample_rate)
    for i in range(0, len(audio), step):
        yield Audio(audio.samples[i : i + step], audio.sample_rate)


class HeardPlayback(BrowserPlayback):
    """The page's playback that also keeps what it was handed: what a person would have heard."""

    def __init__(self) -> None:
        super().__init__()
        self.played: list[Audio] = []

    def play(self, audio: Audio) -> None:
        self.played.append(audio)
        super().play(audio)


def test_a_turn_started_at_a_pause_the_person_talks_past_leaves_no_trace(runners, vad_model, speech60):
    """Speculation: 96 ms into a pause moi starts the turn before it is decided. The lecturer
    pauses 0.8 s mid-sentence ("And the answer that comes back is, ... well, I wouldn't start
    from here, sonny."): the turn started there is dropped when he goes on, and nothing of it is
    shown, played or remembered; the turn started at his last pause is the one answered."""
    from cloud.turn_end import SmartTurn

    cfg = Config.load(env={}, llm__max_tokens=24)
    spoken = Audio.concat([Audio.silence(0.5), speech60.slice(2.5, 4.75), speech60.slice(4.55, 4.85),
                           speech60.slice(4.75, 7.0), Audio.silence(0.5)])
    source = paced(chain(file_source_of(spoken), repeat(Audio.silence(0.1))))
    segmenter = Segmenter(vad_model, cfg.vad, SmartTurn(resolve("turn").path))
    pipe = Pipeline(LocalEngine(cfg, runners), segmenter, cfg, "chat")
    player = HeardPlayback()
    live = LiveSession(pipe, source, player, hears_player=False).start()
    events, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                ev = live.events.get(timeout=0.2)
            except queue.Empty:
                continue
            events.append(ev)
            if isinstance(ev, TurnDone):
                break
        time.sleep(1.0)  # anything a dropped turn would still say, it would say now
        while not live.events.empty():
            events.append(live.events.get_nowait())
    finally:
        live.close()
    machine = live.machine
    assert machine.speculated >= 2 and machine.dropped_speculations >= 1, "no turn was started at the mid-sentence pause"
    # the last one, started at the final pause, was answered
    assert machine.dropped_speculations == machine.speculated - 1
    heard = [e.text for e in events if isinstance(e, Transcript)]
    assert len(heard) == 1 and {"answer", "sonny"} <= words(heard[0]), heard  # the whole thought, once
    turn_events = [e for e in events if isinstance(e, (Transcript, ReplyAudio, ReplyText, TurnDone))]
    assert {e.turn for e in turn_events} == {1}
    assert [(m.role, m.content) for m in pipe.thread.messages()][1:] == [
        ("user", heard[0]), ("assistant", next(e.text for e in events if isinstance(e, ReplyText)))]
    assert player.played == [e.audio for e in events if isinstance(e, ReplyAudio)] != []


def test_a_person_still_talking_when_their_turn_would_start_is_answered_once_for_all_of_it(runners, vad_model,
                                                                                          speech60):
    """The person pauses mid-sentence ("And the answer that comes back is, ... well, I wouldn't
    start from here") while moi is still busy with the turn before (here: its reply held back
    until the second half has begun; live: a reply a barge-in cut, still stopping). The first
    half's turn would start while they talk on: it waits for the rest, and both halves are one
    turn (answered alone, the first half was talked over the second, and a barge-in in between
    was lost on a turn not yet begun)."""
    cfg = Config.load(env={}, llm__max_tokens=16)
    spoken = Audio.concat([Audio.silence(0.5), speech60.slice(0.0, 2.3), Audio.silence(1.0),
                           speech60.slice(2.5, 4.75), Audio.silence(0.8), speech60.slice(4.75, 7.0)])
    source = paced(chain(file_source_of(spoken), repeat(Audio.silence(0.1))))
    pipe = Pipeline(LocalEngine(cfg, runners), Segmenter(vad_model, cfg.vad), cfg, "echo")

    class HeldPlayback(BrowserPlayback):  # the first turn's reply waits until released
        release = threading.Event()

        def play(self, audio: Audio) -> None:
            self.release.wait(60)
            super().play(audio)

    player = HeldPlayback()
    live = LiveSession(pipe, source, player, barge_in="half", hears_player=False).start()
    events, deadline = [], time.monotonic() + 180
    try:
        while time.monotonic() < deadline and sum(isinstance(e, TurnDone) for e in events) < 2:
            try:
                ev = live.events.get(timeout=0.2)
            except queue.Empty:
                continue
            events.append(ev)
            if sum(isinstance(e, SpeechStarted) for e in events) == 3:  # the second half has begun
                player.release.set()
        time.sleep(1.0)
        while not live.events.empty():
            events.append(live.events.get_nowait())
    finally:
        player.release.set()
        live.close()
    heard = [e.text for e in events if isinstance(e, Transcript)]
    assert len(heard) == 2 and "dublin" in words(heard[0]), heard
    assert {"answer", "start", "here"} <= words(heard[1]), heard  # both halves, one turn
