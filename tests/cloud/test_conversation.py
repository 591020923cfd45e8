"""The live conversation's state machine, replayed on a fake clock with the real models, and on
real threads for its shutdown.

Replays (tests/replay.py) feed a recording chunk by chunk through the listening stage (Silero,
Smart Turn) and the machine; after each, ``check_invariants``: every utterance the VAD cut was
answered exactly once or dropped with a reason, and no reply began while the person spoke.
"""

from __future__ import annotations

import queue
import threading
import time

import jiwer
import pytest

from cloud.engine import LocalEngine
from cloud.turn_end import SmartTurn
from cloud.vad import Segmenter
from cloud.conversation import OverMoi, heard_part
from cloud.live import CLOSE_S, IDLE_HOLD_S, LiveSession
from cloud.pipeline import Pipeline
from shared.audio import Audio
from shared.config import Config
from shared.events import (Dropped, MeterTick, ReplyAudio, ReplyPaused, ReplyStopped, ReplyText, ReplyWithdrawn,
                           SpeechEnded, StateChanged, TurnStarted)
from shared.messages import Thread
from shared.models import resolve
from shared.text import spoken_words
from tests.replay import check_invariants, replay

CFG = Config.load(env={}, llm__max_tokens=12)
SAID = "and the answer that comes back is well i wouldn't start from here sonny"


@pytest.fixture(scope="module")
def engine(runners):
    return LocalEngine(CFG, runners)


@pytest.fixture(scope="module")
def smart_turn():
    return SmartTurn(resolve("turn").path)


def pipeline(engine, vad_model, smart_turn, variant: str) -> Pipeline:
    return Pipeline(engine, Segmenter(vad_model, CFG.vad, smart_turn), CFG, variant)


def with_pause(speech60, pause_s: float) -> Audio:
    """'And the answer that comes back is, ... well, I wouldn't start from here, sonny.' with
    a pause of ``pause_s`` inside."""
    return Audio.concat([Audio.silence(0.5), speech60.slice(2.5, 4.75), Audio.silence(pause_s),
                         speech60.slice(4.75, 7.0), Audio.silence(0.5)])


def wer(texts: list[str]) -> float:
    return jiwer.wer(SAID, " ".join(spoken_words(" ".join(texts))))


# Pauses around the turn model's thresholds (turn_silence_ms 200, silence_ms 500, the longest
# wait turn_max_silence_ms 1000), and past the longest wait.
PAUSES = [0.15, 0.3, 0.45, 0.6, 0.9, 1.1, 1.6]


@pytest.mark.parametrize("pause_s", PAUSES)
@pytest.mark.parametrize("variant", ["transcribe", "echo"])
def test_a_sentence_with_a_pause_comes_back_whole(engine, vad_model, smart_turn, speech60, variant, pause_s):
    """Wherever the pause falls, every word reaches a transcript, nothing is answered twice or
    lost, and no reply starts while the person speaks (full duplex: the reply that began in a
    long pause is stopped as they go on, and the whole thought is answered)."""
    r = replay(pipeline(engine, vad_model, smart_turn, variant), with_pause(speech60, pause_s), tail_s=8.0)
    check_invariants(r)
    heard = r.transcripts()
    assert not r.of(Dropped), r.of(Dropped)
    # transcripts follow one another; a reply withdrawn as the person went on is answered again
    # with all of it, so the last transcript holds the whole thought
    assert wer(heard if variant == "transcribe" else heard[-1:]) <= 0.1, heard


@pytest.mark.parametrize("pause_s", [0.6, 1.1])
def test_speech_before_moi_says_a_word_withdraws_the_reply(engine, vad_model, smart_turn, speech60, pause_s):
    """The turn is decided in the pause, but the reply is slow (1.5 s): the person goes on before
    any of it is heard. The reply is withdrawn, nothing of it plays, and both halves are one turn."""
    r = replay(pipeline(engine, vad_model, smart_turn, "echo"), with_pause(speech60, pause_s), latency=1.5,
               tail_s=10.0, barge_in="half")
    check_invariants(r)
    assert not r.of(ReplyStopped) and not r.of(Dropped)
    assert len(r.first_sound) == 1, r.first_sound  # one reply was heard: the whole thought's
    assert wer(r.transcripts()[-1:]) <= 0.1, r.transcripts()
    if pause_s > 1.0:  # long enough for the turn to end in it
        assert any(e.state == "speaking" and "withdrawn" in e.why for e in r.of(StateChanged)), r.of(StateChanged)
        withdrawn, started = r.of(ReplyWithdrawn), r.of(TurnStarted)
        # said so, and the turn that answers both halves keeps the withdrawn one's number
        assert len(withdrawn) == 1 and len(started) == 2 and started[0].turn == started[1].turn == withdrawn[0].turn
        assert started[1].spans[0] == started[0].spans[0] and len(started[1].spans) >= 2


def test_half_duplex_drops_what_it_hears_over_moi_and_says_so(engine, vad_model, smart_turn, speech60):
    """A microphone near the speaker with no echo canceller: speech while moi's voice plays may
    be moi's own; it is not acted on, and a Dropped event says why."""
    r = replay(pipeline(engine, vad_model, smart_turn, "echo"), with_pause(speech60, 0.3), barge_in="half",
               answering=speech60.slice(0.0, 2.3), tail_s=2.0)
    check_invariants(r)
    assert [d.reason for d in r.of(Dropped)] == ["said while moi spoke (half-duplex)"]
    assert r.transcripts() == [] and not r.of(ReplyStopped)


def test_a_file_that_cannot_hear_moi_waits_its_turn(engine, vad_model, smart_turn, speech60):
    """A file played in real time (the web view's sample) cannot hear the speaker: its speech
    over a reply is the person's for sure, and is answered once the reply has played."""
    r = replay(pipeline(engine, vad_model, smart_turn, "echo"), with_pause(speech60, 0.3), barge_in="auto",
               hears_player=False, answering=speech60.slice(0.0, 2.3), answering_s=14.0, tail_s=15.0)
    check_invariants(r)
    assert wer(r.transcripts()) <= 0.1 and not r.of(Dropped) and not r.of(ReplyStopped)
    assert len(r.first_sound) == 1  # answered once, after the reply it waited for


def test_a_barge_in_with_a_pause_in_it_is_one_turn(engine, vad_model, smart_turn, speech60):
    """auto with a canceller that lets the person through: the reply pauses as they start,
    stops once they talk on, and both halves of what they said (a pause inside) are one turn."""
    r = replay(pipeline(engine, vad_model, smart_turn, "echo"), with_pause(speech60, 0.45), barge_in="auto",
               over_moi=lambda t: OverMoi(True, True, False), answering=speech60.slice(0.0, 2.3), tail_s=8.0)
    check_invariants(r)
    assert [e.paused for e in r.of(ReplyPaused)] == [True]
    assert [e.reason for e in r.of(ReplyStopped)] == ["barge-in"]
    assert wer(r.transcripts()[-1:]) <= 0.1, r.transcripts()


@pytest.mark.parametrize("piece_gap_s, stop_at", [(None, 4.0), (6.0, 5.5)])
def test_stop_cuts_the_reply_and_the_next_turn_is_answered(engine, vad_model, smart_turn, speech60, piece_gap_s, stop_at):
    """Stop while moi answers: the speaker goes quiet then, and what the person says next is
    answered as before; also when Stop comes while the speaker waits for the next piece (6 s
    apart): the answer ends there, and the next turn does not wait for the pieces it dropped."""
    q = speech60.slice(0.0, 2.3)
    spoken = Audio.concat([Audio.silence(0.3), q, Audio.silence(4.0), speech60.slice(2.5, 7.0), Audio.silence(0.5)])
    r = replay(pipeline(engine, vad_model, smart_turn, "echo"), spoken, stop_at=stop_at, tail_s=8.0,
               piece_gap_s=piece_gap_s)
    check_invariants(r)
    (stop,) = r.of(ReplyStopped)
    assert stop.reason == "stop" and stop.t == pytest.approx(stop_at, abs=0.04)
    stops = [t for w, t in r.player.log if w == "stop"]
    assert stops == ([pytest.approx(stop_at, abs=0.04)] if piece_gap_s is None else []), r.player.log  # else dry
    assert len(r.first_sound) == 2 and len(r.transcripts()) == 2
    last = r.of(SpeechEnded)[-1]
    assert r.first_sound[2] - last.t <= 0.5, (r.first_sound, last)  # the answer's latency, no more


def test_heard_part_is_the_pieces_played_then_the_words_of_the_share_played():
    pieces = [("Sure, here is one.", 1.0), ("A cat sat on the mat.", 2.0)]
    assert heard_part(pieces, 0.0) == "Sure, here is one. A cat sat on the mat."
    assert heard_part(pieces, 1.0) == "Sure, here is one. A cat sat"  # half of six words
    assert heard_part(pieces, 2.0) == "Sure, here is one."
    assert heard_part(pieces, 2.5) == "Sure, here"
    assert heard_part(pieces, 3.2) == heard_part([], 0.0) == ""


@pytest.mark.parametrize("piece_gap_s", [None, 2.0])
def test_a_stopped_reply_is_remembered_as_far_as_it_was_heard(engine, vad_model, smart_turn, speech60, piece_gap_s):
    """Stop halfway through the reply's first piece: the thread keeps the question and the words
    of the reply that played, not what the models had made of it (all of it, made before the
    Stop; or, its pieces 2 s apart, the words written by then), so the next turn is asked on
    what the person heard."""
    chat = Pipeline(engine, Segmenter(vad_model, CFG.vad, smart_turn), Config.load(env={}, llm__max_tokens=40), "chat")
    spoken = Audio.concat([Audio.silence(0.3), speech60.slice(0.0, 2.3), Audio.silence(1.0)])
    whole = replay(chat, spoken, tail_s=20.0, piece_gap_s=piece_gap_s)
    made = " ".join(e.text for e in whole.of(ReplyAudio))
    first = whole.of(ReplyAudio)[0]
    assert len(whole.of(ReplyAudio)) >= 2 and len(first.text.split()) >= 3, made
    assert [m.content for m in chat.thread.messages()][-1] == whole.of(ReplyText)[-1].text  # played out: all of it

    chat.thread = Thread(CFG.llm.system_prompt, CFG.llm.max_turns)
    stop_at = whole.first_sound[1] + first.audio.seconds / 2
    r = replay(chat, spoken, tail_s=20.0, piece_gap_s=piece_gap_s, stop_at=stop_at)
    check_invariants(r)
    assert [e.reason for e in r.of(ReplyStopped)] == ["stop"]
    user, said = [m.content for m in chat.thread.messages()][-2:]
    assert user == r.transcripts()[0]
    words, n = said.split(), len(first.text.split())
    assert " ".join(first.text.split()).startswith(said) and n / 2 - 1 <= len(words) < n, (said, first.text)
    if piece_gap_s is None:
        assert r.of(ReplyText)[0].text == whole.of(ReplyText)[0].text  # all of it made before the Stop


# --- shutdown on real threads ------------------------------------------------------------------


class Paced:
    """A microphone: ``audio`` then silence, a 32 ms chunk every 32 ms, until closed."""

    captured_at = 0.0

    def __init__(self, audio: Audio) -> None:
        self.audio, self.closed = audio, threading.Event()

    def close(self) -> None:
        self.closed.set()

    def __iter__(self):
        i, start, n = 0, time.monotonic(), 512
        while not self.closed.is_set():
            chunk = self.audio.samples[i : i + n]
            if len(chunk) < n:
                chunk = Audio.silence(n / 16000).samples
            i += n
            time.sleep(max(0.0, start + i / 16000 - time.monotonic()))
            yield Audio(chunk, 16000)


class Holding(Paced):
    """A microphone that can hold its blocks (as local.audio_io.MicSource does): what the
    session asked of it is logged at each block, with where in the stream that block was."""

    def __init__(self, audio: Audio) -> None:
        super().__init__(audio)
        self.hold_s, self.log = 0.0, []

    def __iter__(self):
        for n, chunk in enumerate(super().__iter__()):
            self.log.append((n * 512 / 16000, self.hold_s))
            yield chunk


def test_a_microphone_is_taken_in_batches_only_while_nothing_happens(engine, vad_model, smart_turn, speech60):
    """While nobody speaks and nothing plays, the session lets the microphone's blocks gather
    (fewer wake-ups while listening all day); from the first word to the reply's end it takes
    each block as it comes, and the question is answered."""
    spoken = Audio.concat([Audio.silence(2.0), speech60.slice(0.0, 2.3), Audio.silence(30.0)])
    mic, player = Holding(spoken), RealTimePlayer()
    live = LiveSession(pipeline(engine, vad_model, smart_turn, "chat"), mic, player, barge_in="half",
                       meters=False).start()
    heard = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (heard and not player.playing and not live.answering):
            try:
                ev = live.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(ev, ReplyAudio):
                heard.append(ev)
        done_at = (len(mic.log) + 1) * 512 / 16000
        time.sleep(1.0)
    finally:
        live.close()
    assert heard, "the question was not answered"
    assert all(h == IDLE_HOLD_S for t, h in mic.log if 0.2 < t < 1.9)  # silence before the question
    assert all(h == 0.0 for t, h in mic.log if 2.2 < t < 4.2)  # the question and the turn's end
    assert all(h == IDLE_HOLD_S for t, h in mic.log if done_at + 0.2 < t)  # idle again after the reply


class Gathering(Holding):
    """A microphone that holds its blocks as local.audio_io.MicSource does: what gathered while
    the session asked it to hold comes as one chunk."""

    def __iter__(self):
        held = []
        for block in super().__iter__():
            held.append(block)
            if len(held) * 512 / 16000 >= self.hold_s:
                yield Audio.concat(held)
                held = []


def test_a_view_gets_every_meter_tick_of_a_held_microphone(engine, vad_model, smart_turn):
    """With a view drawing meters the microphone's blocks gather too while nothing happens (the
    meters move in steps, a few times a second); every tick of the stream still reaches the view,
    in order."""
    mic = Gathering(Audio.silence(2.0))
    live = LiveSession(pipeline(engine, vad_model, smart_turn, "chat"), mic, RealTimePlayer(), barge_in="half",
                       meters=True).start()
    try:
        time.sleep(3.0)
    finally:
        live.close()
    events = []
    while (ev := live.events.get(timeout=5)) is not None:
        events.append(ev)
    ticks = [ev.audio_t for ev in events if isinstance(ev, MeterTick) and ev.stage == "pre"]
    assert len(ticks) >= 40  # 2.0 s at 50 ms a tick, and more
    assert ticks == pytest.approx([0.05 * (k + 1) for k in range(len(ticks))])
    assert all(h == IDLE_HOLD_S for t, h in mic.log if 0.2 < t < 2.5)


class RealTimePlayer:
    """A speaker in real time, with pause: what a person would hear, without a sound card."""

    pausable = True

    def __init__(self) -> None:
        self.left, self.at, self.paused = 0.0, time.monotonic(), False
        self.lock = threading.Lock()

    def _advance(self) -> None:
        now = time.monotonic()
        if not self.paused:
            self.left = max(0.0, self.left - (now - self.at))
        self.at = now

    @property
    def playing(self) -> bool:
        with self.lock:
            self._advance()
            return self.left > 0

    def play(self, audio: Audio) -> None:
        with self.lock:
            self._advance()
            self.left += audio.seconds

    def pause(self) -> None:
        with self.lock:
            self._advance()
            self.paused = True

    def resume(self) -> None:
        with self.lock:
            self._advance()
            self.paused = False

    def stop(self) -> float:
        with self.lock:
            self._advance()
            left, self.left, self.paused = self.left, 0.0, False
            return left


class Someone:
    """An echo canceller that passes the microphone through and is sure someone talks over moi
    (it pauses every reply), though it never lets a person through."""

    converged, playing = True, True

    def __init__(self) -> None:
        self.talk = type("T", (), {"person": lambda self: False, "someone": lambda self: True})()

    def __call__(self, chunk, captured_at):
        return chunk

    def linear(self, start_s, n):
        return None

    def played(self, start_s, end_s):
        return False


@pytest.mark.parametrize("state", ["listening", "speaking", "deciding", "answering", "paused"])
def test_close_ends_the_session_within_two_seconds_in_every_state(engine, vad_model, smart_turn, speech60, state):
    """Ctrl-C, q and the page's End call close(): whatever the session is doing, it returns
    within ~2 s and every thread the session started has ended."""
    spoken = Audio.concat([Audio.silence(0.3), speech60.slice(0.0, 7.0), Audio.silence(30.0)])
    echo = Someone() if state == "paused" else None
    live = LiveSession(pipeline(engine, vad_model, smart_turn, "chat"), Paced(spoken), RealTimePlayer(),
                       barge_in="auto", echo=echo).start()
    before = set(threading.enumerate())
    seen, deadline = [], time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                ev = live.events.get(timeout=0.1)
            except queue.Empty:
                ev = None
            if isinstance(ev, StateChanged):
                seen.append(ev.state)
            if state == "listening" and time.monotonic() > deadline - 59.9:
                break
            if isinstance(ev, StateChanged) and ev.state == state:
                break
        assert state in seen or state == "listening", seen
    finally:
        started = [t for t in threading.enumerate() if t.name.startswith("moi-")]
        t0 = time.monotonic()
        live.close()
        took = time.monotonic() - t0
    assert took < 2.0, f"close() took {took:.2f} s in {state}"
    assert live.wait(0.5), "the session did not say it ended"
    left = [t.name for t in started if t.is_alive()]
    assert took < CLOSE_S + 0.3 and not left, (took, left)
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("moi-") and t.is_alive()]
