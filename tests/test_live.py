"""The live path on a real PortAudio stack: PulseAudio null sinks as microphone and speaker."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from local.audio_io import MicSource, Player, list_devices
from cloud.engine import LocalEngine
from cloud.live import IDLE_HOLD_S, LiveSession
from cloud.pipeline import Pipeline
from cloud.vad import Segmenter
from shared.audio import Audio
from shared.config import Config
from shared.errors import AudioError
from shared.events import ErrorEvent, ReplyAudio, ReplyStopped, ReplyText, ReplyToken, Transcript, TurnDone
from tests import pulse
from tests.conftest import ROOT, words

CFG = Config.load(env={}, llm__max_tokens=40)


@pytest.fixture(scope="module", autouse=True)
def sound_server():
    pulse.start()
    yield
    pulse.start()  # leave it running for whoever comes next (a test may have killed it)


@pytest.fixture(scope="module")
def engine(runners):
    return LocalEngine(CFG, runners)


@pytest.fixture(scope="module")
def question(tmp_path_factory, speech60):
    """0.5 s of silence, then "and says, how do I get to Dublin?" (~2.2 s), then silence."""
    path = tmp_path_factory.mktemp("live") / "question.wav"
    Audio.concat([Audio.silence(0.5), speech60.slice(0.0, 2.3), Audio.silence(1.5)]).save_wav(path)
    return path


@pytest.fixture(scope="module")
def long_line(tmp_path_factory, speech60):
    """A long utterance (~4.5 s) whose echo keeps moi talking for a while."""
    path = tmp_path_factory.mktemp("live") / "long.wav"
    Audio.concat([Audio.silence(0.3), speech60.slice(2.4, 7.1), Audio.silence(1.2)]).save_wav(path)
    return path


def session(engine, vad_model, variant, player=None, barge_in="half", **mic):
    pipe = Pipeline(engine, Segmenter(vad_model, CFG.vad), CFG, variant)
    return LiveSession(pipe, MicSource(**mic).start(), player, barge_in=barge_in).start()


def collect(live, until, timeout=60.0):
    """Events until ``until(events)`` is true (or the timeout); the session keeps running."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and not until(events):
        try:
            ev = live.events.get(timeout=0.1)
        except Exception:  # queue.Empty
            continue
        if ev is None:
            break
        events.append(ev)
    return events


def has(kind, **match):
    return lambda events: any(isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items()) for e in events)


def test_devices_are_listed():
    found = list_devices()
    assert any(d.inputs > 0 and d.is_default_input for d in found)
    assert any(d.outputs > 0 and d.is_default_output for d in found)


def test_virtual_microphone_to_transcript(engine, vad_model, question):
    live = session(engine, vad_model, "transcribe")
    try:
        pulse.play(question).wait()
        events = collect(live, has(Transcript))
    finally:
        live.close()
    texts = [e.text for e in events if isinstance(e, Transcript)]
    assert texts and {"dublin", "get"} <= words(texts[0]), [e for e in events if not hasattr(e, "rms_db")][:20]
    assert live.source.overflows == 0


@pytest.mark.parametrize("meters", [True, False], ids=["view", "quiet"])
def test_a_recording_with_pauses_comes_back_whole_ten_times_in_one_session(engine, vad_model, speech60, tmp_path,
                                                                           meters):
    """One transcribe session with the defaults (Smart Turn, barge-in auto), the lecture's 7 s
    with its pauses ("and says, how do I get to Dublin? And the answer that comes back is, ...
    well, I wouldn't start from here, sonny.") played ten times into the virtual mic: every
    play comes back whole, and every utterance the VAD cut is in a transcript or a drop. With a
    view's meters (measured on every chunk) and without (quiet, JSON); either way the blocks
    that gather while nobody speaks come as one chunk (MicSource.hold_s)."""
    import jiwer

    from cloud.turn_end import SmartTurn
    from shared.events import Dropped, SpeechEnded, SpeechStarted
    from shared.models import resolve
    from shared.text import spoken_words

    said = "and says how do i get to dublin and the answer that comes back is well i wouldn't start from here sonny"
    path = tmp_path / "pauses.wav"
    Audio.concat([Audio.silence(0.3), speech60.slice(0.0, 7.1), Audio.silence(0.8)]).save_wav(path)
    pipe = Pipeline(engine, Segmenter(vad_model, CFG.vad, SmartTurn(resolve("turn").path)), CFG, "transcribe")
    live = LiveSession(pipe, MicSource().start(), None, barge_in="auto", meters=meters).start()
    plays, all_events = [], []
    try:
        for _ in range(10):
            pulse.play(path).wait()

            def settled(events):  # every utterance cut so far has its transcript or its drop
                ends = sum(isinstance(e, SpeechEnded) for e in events)
                done = sum(isinstance(e, (Transcript, Dropped)) for e in events)
                return ends and done >= ends and not live.machine.speaking

            # the card's own latency: the play's end reaches the microphone a while after paplay
            # ends, so a play is over once settled and quiet for 1.5 s
            events, deadline = [], time.monotonic() + 40
            while time.monotonic() < deadline:
                more = collect(live, lambda ev: False, timeout=1.5)
                events += more
                if settled(events) and not any(isinstance(e, (SpeechStarted, SpeechEnded)) for e in more):
                    break
            all_events += events
            plays.append(" ".join(e.text for e in events if isinstance(e, Transcript)))
    finally:
        live.close()
    errors = [jiwer.wer(said, " ".join(spoken_words(p)) or "-") for p in plays]
    assert all(e <= 0.1 for e in errors), list(zip(errors, plays))
    dropped = [e for e in all_events if isinstance(e, Dropped)]
    assert all(d.reason == "too short" for d in dropped), dropped
    assert live.source.overflows == 0


def test_held_blocks_come_as_one_chunk_and_one_run_of_the_stream(speech60, tmp_path):
    """While idle the microphone hands over what gathered in ``hold_s`` as one chunk: chunks of
    many blocks, and speech played into it comes back whole (a block lost or put out of order
    between chunks would shift the rest of the clip, and its correlation with the clip would
    fall to that of the part before)."""
    clip = speech60.slice(0.0, 7.1)
    path = tmp_path / "clip.wav"
    Audio.concat([Audio.silence(0.5), clip, Audio.silence(1.0)]).save_wav(path)
    mic = MicSource().start()
    mic.hold_s = IDLE_HOLD_S
    chunks = []
    try:
        play, end = None, time.monotonic() + 10.0
        for chunk in mic:
            chunks.append(chunk)
            if play is None:
                play = pulse.play(path)
            if time.monotonic() > end:
                break
        play.wait()
    finally:
        mic.close()
    sizes = [len(c.samples) for c in chunks[1:]]
    assert np.median(sizes) >= 10 * mic.block, sizes
    heard = np.concatenate([c.samples for c in chunks])
    want = clip.samples
    size = 1 << int(np.ceil(np.log2(len(heard) + len(want))))
    cc = np.fft.irfft(np.fft.rfft(heard, size) * np.conj(np.fft.rfft(want, size)), size)[: len(heard) - len(want)]
    at = int(np.argmax(cc))
    got = heard[at : at + len(want)]
    corr = float(np.dot(got, want) / np.sqrt(np.dot(got, got) * np.dot(want, want)))
    assert corr > 0.9, corr
    assert mic.overflows == 0


def test_a_device_that_wants_another_rate_is_resampled(engine, vad_model, question, monkeypatch):
    import local.audio_io as audio_io

    monkeypatch.setattr(audio_io, "_open_rate", lambda sd, device, kind: 44_100)  # as if 16 kHz were refused
    live = session(engine, vad_model, "transcribe")
    try:
        assert live.source.rate == 44_100
        pulse.play(question).wait()
        events = collect(live, has(Transcript))
    finally:
        live.close()
    assert "dublin" in words(" ".join(e.text for e in events if isinstance(e, Transcript)))


def test_a_paused_reply_goes_on_where_it_paused(tmp_path):
    """Player.pause silences the speaker at once and keeps the rest; resume plays it: on the
    recording, 0.7 s of sound, a gap at least as long as the pause, then the rest, none of it
    lost (what the sound server held when it paused is played again). The gap is longer on
    this card: a restarted stream starts 1.7 s deep in the null sink (pactl's sink latency),
    and drains in real time."""
    raw = tmp_path / "speaker.raw"
    player = Player()
    player.play(Audio.silence(1.0))  # a fresh stream on a fresh sound server calls back slowly at first
    assert player.wait(timeout=10)
    rec = pulse.record(raw)
    t = np.arange(2 * 16_000) / 16_000
    tone = Audio((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000)  # 2 s
    try:
        time.sleep(1.0)  # parec starts
        player.play(tone)
        time.sleep(0.7)
        player.pause()
        played = player.played_s
        time.sleep(1.0)
        assert player.playing and player.paused and player.played_s == played
        player.resume()
        assert player.wait(timeout=5)
        time.sleep(0.5)
    finally:
        player.close()
        rec.terminate()
        rec.wait()
    pcm = raw.read_bytes()
    heard = Audio.from_pcm16(pcm[: len(pcm) // 2 * 2], 16_000).samples
    loud = np.array([np.sqrt(np.mean(heard[i : i + 160] ** 2)) > 0.05 for i in range(0, len(heard) - 159, 160)])
    runs = np.flatnonzero(np.diff(loud.astype(int)))  # where sound starts and stops, 10 ms frames
    assert len(runs) == 4, runs  # on, off (paused), on again, off (done)
    first, gap = (runs[1] - runs[0]) / 100, (runs[2] - runs[1]) / 100
    assert 0.55 <= first <= 0.85, first  # silent as it paused, not later
    assert 0.9 <= gap <= 3.0, gap
    assert 1.95 <= loud.sum() / 100 <= 2.3, loud.sum()  # all of it, and at most what was held again


def test_a_player_paused_while_it_waits_for_the_next_piece_holds_it_back():
    """The reply's speaker ran dry between two pieces and was paused then: the next piece,
    given while it is paused, waits for resume, and then plays whole."""
    player = Player()
    try:
        player.play(Audio.silence(0.2))
        assert player.wait(timeout=10)  # ran dry
        player.pause()
        played = player.played_s
        player.play(Audio(np.full(8_000, 0.1, np.float32), 16_000))  # 0.5 s
        time.sleep(0.6)
        assert player.paused and player.playing and player.played_s == played
        player.resume()
        assert player.wait(timeout=5)
        assert player.played_s - played == pytest.approx(0.5, abs=0.005)
    finally:
        player.close()


def test_reply_reaches_the_virtual_speaker(engine, vad_model, question, stt, tmp_path):
    raw = tmp_path / "speaker.raw"
    rec = pulse.record(raw)
    player = Player()
    live = session(engine, vad_model, "echo", player)
    try:
        pulse.play(question).wait()
        events = collect(live, has(TurnDone))
        assert any(isinstance(e, ReplyAudio) for e in events), [e for e in events if not hasattr(e, "rms_db")]
        assert player.wait(timeout=20)
        time.sleep(0.5)
    finally:
        live.close()
        player.close()
        rec.terminate()
        rec.wait()
    heard = Audio.from_pcm16(raw.read_bytes()[: len(raw.read_bytes()) // 2 * 2], 16_000)
    assert heard.seconds > 1.0 and np.abs(heard.samples).max() > 0.05
    text = stt.transcribe(heard).text
    # moi's voice, through the speaker: its words ("Dublin" in Piper's voice is heard now and
    # then as "double in", whatever Whisper's window)
    assert len(words(text) & {"how", "do", "i", "get", "to", "dublin"}) >= 5, text


def test_barge_in_stops_playback_within_200ms_and_the_talk_goes_on(engine, vad_model, long_line, question):
    player = Player()
    live = session(engine, vad_model, "echo", player, barge_in="full")
    try:
        pulse.play(long_line).wait()
        # from the second piece on: the first is four words (~1 s), and a barge-in in the gap
        # before the next piece found the speaker already silent, with no stop to time
        collect(live, lambda ev: sum(isinstance(e, ReplyAudio) for e in ev) >= 2)
        time.sleep(0.3)
        assert player.playing
        lead = 0.5  # the question file starts with this much silence
        injected = time.monotonic()
        pulse.play(question)
        events = collect(live, has(ReplyStopped), timeout=10)
        stop = [e for e in events if isinstance(e, ReplyStopped)]
        assert stop and stop[0].reason == "barge-in"
        assert player.stopped_at is not None
        reaction = player.stopped_at - (injected + lead)
        assert reaction < 0.2, f"playback stopped {reaction * 1000:.0f} ms after speech onset"
        assert not player.playing
        more = collect(live, lambda ev: sum(isinstance(e, Transcript) for e in ev) >= 1 and has(TurnDone)(ev))
    finally:
        live.close()
        player.close()
    transcripts = [e for e in more if isinstance(e, Transcript)]
    assert transcripts and "dublin" in words(transcripts[-1].text)  # the interruption became the next turn


def test_half_duplex_ignores_speech_while_moi_speaks(engine, vad_model, long_line, question):
    player = Player()
    live = session(engine, vad_model, "echo", player, barge_in="half")
    try:
        pulse.play(long_line).wait()
        collect(live, has(ReplyAudio))
        pulse.play(question).wait()
        events = collect(live, lambda ev: False, timeout=3)
    finally:
        live.close()
        player.close()
    assert not any(isinstance(e, ReplyStopped) for e in events)
    assert sum(isinstance(e, Transcript) for e in events) == 0  # no turn from speech over moi's voice


def test_stop_cuts_the_reply_and_the_conversation_continues(engine, vad_model, question):
    player = Player()
    live = session(engine, vad_model, "chat", player)
    try:
        pulse.play(question).wait()
        collect(live, has(ReplyToken))
        pressed = time.monotonic()
        live.stop_reply("stop")  # taken by the machine's thread: the speaker goes quiet within 0.2 s
        while player.playing and time.monotonic() - pressed < 0.2:
            time.sleep(0.005)
        assert not player.playing and (player.stopped_at is None or player.stopped_at - pressed < 0.2)
        # a fast voice can have made the whole reply before the Stop is taken: its turn is done
        # first, and the reply's text is not cut (the thread keeps what was heard of it)
        first = collect(live, lambda ev: has(TurnDone)(ev) and has(ReplyStopped)(ev))
        kept = [m.content for m in live.pipeline.thread.messages() if m.role == "assistant"]
        pulse.play(question).wait()
        second = collect(live, lambda ev: has(TurnDone)(ev) and has(ReplyText, cancelled=False)(ev))
    finally:
        live.close()
        player.close()
    assert any(isinstance(e, ReplyStopped) and e.reason == "stop" for e in first)
    (made,) = [e.text for e in first if isinstance(e, ReplyText)]
    played = " ".join(e.text for e in first if isinstance(e, ReplyAudio))
    # what the thread kept of it: at most the words that went to the speaker, never more
    assert len(kept) <= 1 and " ".join(played.split()).startswith("".join(kept)), (kept, played)
    assert len(" ".join(kept).split()) < max(1, len(made.split())), (kept, made)
    done = [e for e in second if isinstance(e, ReplyText)]
    assert done and not done[-1].cancelled and done[-1].text  # answered after the Stop
    assert live.pipeline.thread.messages()[-1].content == done[-1].text


def _tone_cut_after(tmp_path, monkeypatch) -> tuple[list[float], float]:
    """Play a tone to a sound server that holds 0.3 s of the stream (as the bench card's combine
    sinks and deep device buffers do), stop it once a second of it has been handed to
    PortAudio, then play 0.5 s more: the sounds the speaker's recording holds (s) and the
    seconds handed to PortAudio before the stop. The depth is asked for by the client
    (libpulse's PULSE_LATENCY_MSEC): a combine sink's own depth varied from 0.25 s to 0.05 s
    between machines, and at 0.05 s a stop that only stopped feeding would have passed."""
    rate = 16_000
    tone = Audio((0.3 * np.sin(2 * np.pi * 440 * np.arange(rate * 4) / rate)).astype(np.float32), rate)
    raw = tmp_path / "speaker.raw"
    monkeypatch.setenv("PULSE_LATENCY_MSEC", "300")
    rec = pulse.record(raw)
    player = None
    try:
        player = Player()
        time.sleep(0.5)
        player.play(tone)
        deadline = time.monotonic() + 10
        while player.played_s < 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        player.stop()
        handed = player.played_s
        time.sleep(1.0)
        player.play(Audio(tone.samples[: rate // 2], rate))
        assert player.wait(timeout=5), "the speaker stopped playing after a stop"
        time.sleep(1.0)
    finally:
        if player is not None:
            player.close()
        rec.terminate()
        rec.wait()
    pcm = np.abs(np.frombuffer(raw.read_bytes(), "<i2").astype(np.float32) / 32768)
    loud = pcm[: len(pcm) // 16 * 16].reshape(-1, 16).max(axis=1) > 0.05  # 1 ms frames
    edges = np.diff(np.concatenate([[0], loud.astype(np.int8), [0]]))
    return list((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)) / 1000), handed


def test_stop_drops_what_the_output_buffers_hold_and_the_speaker_plays_again(tmp_path, monkeypatch):
    """Sound the player handed on sits in the sound server's buffers (0.2 s and more through a
    combine sink or a deep device buffer, 50 ms on a bare null sink): a stop that only stopped
    feeding them let all of it play. A stop restarts the stream, so what was buffered never
    plays, and the next reply plays in full."""
    sounds, handed = _tone_cut_after(tmp_path, monkeypatch)
    assert len(sounds) == 2, sounds  # the cut reply, then the next one
    assert sounds[0] < handed - 0.2, (sounds[0], handed)  # what was buffered (0.3 s) never played
    assert sounds[1] == pytest.approx(0.5, abs=0.03)


def test_no_input_device_is_a_clear_error():
    with pytest.raises(AudioError, match="no input device 'no-such-mic'"):
        MicSource("no-such-mic")
    r = subprocess.run([sys.executable, "-m", "local.cli", "--input-device", "no-such-mic", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no input device" in r.stderr and "Traceback" not in r.stderr
    no_server = {**os.environ, "PULSE_SERVER": "/nonexistent"}  # no sound server: no default device at all
    r = subprocess.run([sys.executable, "-m", "local.cli", "--quiet", "--seconds", "2"],
                       cwd=ROOT, env=no_server, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no default input device" in r.stderr and "Traceback" not in r.stderr


def test_terminal_view_in_tmux(question):
    if not shutil.which("tmux"):
        pytest.fail("tmux is not installed: `apt-get install tmux`")
    name = f"moi-test-{os.getpid()}"
    cmd = f"cd {ROOT} && {sys.executable} -m local.cli --input mic --pipeline transcribe --seconds 8"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "110", "-y", "30", cmd], check=True)
    try:
        time.sleep(4)  # models load
        pulse.play(question).wait()
        screen = ""
        for _ in range(40):
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout
            if "dublin" in screen.lower():
                break
            time.sleep(0.25)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    assert "before VAD" in screen and "after VAD" in screen and "reply" in screen
    assert "you:" in screen and "dublin" in screen.lower()
    assert any(ch in screen for ch in "▂▃▄▅▆▇█")  # the meters drew levels


def test_device_unplugged_mid_run_ends_cleanly(engine, vad_model):
    live = session(engine, vad_model, "transcribe", stall_s=1.0)
    try:
        collect(live, lambda ev: len(ev) > 20, timeout=5)
        pulse.stop()  # the sound server (and with it the device) goes away
        started = time.monotonic()
        events = collect(live, lambda ev: False, timeout=10)
        assert time.monotonic() - started < 8  # no hang
    finally:
        live.close()
        pulse.start()
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert errors and ("unplugged" in errors[0].message or "stopped" in errors[0].message)


def test_stop_key_in_the_terminal_view(long_line, tmp_path):
    """Space in the live view stops the reply (the Stop key), seen on the rendered screen."""
    name = f"moi-stop-{os.getpid()}"
    cmd = f"cd {ROOT} && {sys.executable} -m local.cli --input mic --pipeline echo --seconds 25"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "110", "-y", "30", cmd], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout

    try:
        time.sleep(4)
        pulse.play(long_line).wait()
        for _ in range(80):  # until moi starts answering
            if "speaking ●" in screen():
                break
            time.sleep(0.1)
        subprocess.run(["tmux", "send-keys", "-t", name, "Space"], check=True)
        shown = ""
        for _ in range(40):
            shown = screen()
            if "stopped by stop" in shown:
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    assert "stopped by stop" in shown, shown
