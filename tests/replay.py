"""Replaying a recording through the live conversation on a fake clock.

The listening stage (real Silero, real Smart Turn) and the state machine run on this thread,
chunk by chunk; the answer jobs run the real models when they come due, ``latency`` seconds of
fake time after they were started (a job cancelled by then never runs); the player plays in
fake time. A 20 s recording replays in about the time its models take.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field, replace

from cloud.conversation import (
    Utterance,
    Answer,
    Check,
    Checked,
    Conversation,
    InputEnded,
    JobEnded,
    Output,
    StopReply,
    Tick,
)
from cloud.pipeline import Listener, Pipeline
from shared.audio import SPEECH_RATE, Audio
from shared.events import (
    Dropped,
    Event,
    ReplyAudio,
    SpeechEnded,
    SpeechStarted,
    Transcript,
)

CHUNK = 512  # a microphone's 32 ms


class FakePlayer:
    """A speaker on the fake clock: what it was given plays out in real (fake) time."""

    def __init__(self, pausable: bool = True) -> None:
        self.pausable = pausable
        self.now = 0.0
        self.left = 0.0  # seconds still to play
        self.paused = False
        self.log: list[tuple[str, float]] = []  # (what, when)

    def advance(self, t: float) -> None:
        if not self.paused:
            self.left = max(0.0, self.left - (t - self.now))
        self.now = t

    @property
    def playing(self) -> bool:
        return self.left > 1e-9

    def play(self, audio: Audio) -> None:
        self.log.append(("play", self.now))
        self.left += audio.seconds

    def pause(self) -> None:
        self.log.append(("pause", self.now))
        self.paused = True

    def resume(self) -> None:
        self.log.append(("resume", self.now))
        self.paused = False

    def stop(self) -> float:
        if self.playing:
            self.log.append(("stop", self.now))
        left, self.left, self.paused = self.left, 0.0, False
        return left


@dataclass
class Replay:
    """Everything a replay produced: the machine's events, and the machine itself."""

    events: list[Event]
    machine: Conversation
    player: FakePlayer
    first_sound: dict[int, float] = field(default_factory=dict)  # turn -> when its reply began to play

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def transcripts(self) -> list[str]:
        return [e.text for e in self.of(Transcript)]


class ReplayJobs:
    """The machine's workers on the fake clock: a job's results come ``latency`` s after it
    was started (answers one after another, as the live worker runs them). ``piece_gap_s``:
    each piece of a reply after the first, and the answer's end, come that much after the one
    before (a synthesis slower than the speaker, which then runs dry); else all at once."""

    def __init__(self, pipeline: Pipeline, clock, latency: float, check_latency: float,
                 piece_gap_s: float | None = None) -> None:
        self.pipeline, self.clock, self.latency, self.check_latency = pipeline, clock, latency, check_latency
        self.piece_gap_s = piece_gap_s
        self.due: list[tuple[float, int, object]] = []  # jobs, and an answer's results to deliver
        self._seq = itertools.count()
        self._free_at = float("-inf")  # answers run one at a time

    def answer(self, job: Answer) -> None:
        self._end_cancelled(self.clock())
        at = max(self.clock(), self._free_at) + self.latency
        self._free_at = at
        heapq.heappush(self.due, (at, next(self._seq), job))

    def check(self, job: Check) -> None:
        heapq.heappush(self.due, (self.clock() + self.check_latency, next(self._seq), job))

    def run_due(self, now: float) -> list:
        """The inputs of every job due by ``now``, in order."""
        self._end_cancelled(now)
        out: list = []
        while self.due and self.due[0][0] <= now:
            at, _, job = heapq.heappop(self.due)
            if isinstance(job, Check):
                out.append(Checked(at, job.id, self.pipeline.has_words(job.utterance.audio)))
            elif isinstance(job, Answer):
                self._run(job, at)
            else:  # a result: an answer cancelled meanwhile says nothing more, and ends
                answer, inp = job
                if isinstance(inp, JobEnded) or not answer.cancel.is_set():
                    out.append(inp)
        return out

    def _end_cancelled(self, now: float) -> None:
        """An answer cancelled while its pieces were still to come ends now, as the live worker's
        does at its next step: what it had left is dropped, and the next answer need not wait."""
        cut = {item[0].id: item[0] for at, _, item in self.due if isinstance(item, tuple) and item[0].cancel.is_set()
               and (at > now or not isinstance(item[1], JobEnded))}
        if not cut:
            return
        kept = [d for d in self.due if not (isinstance(d[2], tuple) and d[2][0].id in cut)]
        kept += [(now, next(self._seq), (job, JobEnded(now, job.id))) for job in cut.values()]
        heapq.heapify(kept)
        self.due = kept
        self._free_at = max((at for at, _, item in kept if isinstance(item, Answer)
                             or isinstance(item, tuple) and isinstance(item[1], JobEnded)), default=float("-inf"))

    def _run(self, job: Answer, at: float) -> None:
        t, pieces = at, 0
        if not job.cancel.is_set():
            for ev in self.pipeline.answer(job.utterance.audio, job.request, job.cancel, lambda: at):
                if isinstance(ev, ReplyAudio):
                    if pieces and self.piece_gap_s is not None:
                        t += self.piece_gap_s
                    pieces += 1
                heapq.heappush(self.due, (t, next(self._seq), (job, Output(t, job.id, ev))))
        if pieces and self.piece_gap_s is not None:
            t += self.piece_gap_s
        heapq.heappush(self.due, (t, next(self._seq), (job, JobEnded(t, job.id))))
        self._free_at = max(self._free_at, t)


def replay(
    pipeline: Pipeline,
    audio: Audio,
    *,
    barge_in: str = "full",
    hears_player: bool = True,
    latency: float = 0.4,
    check_latency: float = 0.3,
    tail_s: float = 30.0,
    over_moi=None,
    stop_at: float | None = None,
    echo=None,
    answering: Audio | None = None,
    answering_s: float = 60.0,
    pausable: bool = True,
    piece_gap_s: float | None = None,
) -> Replay:
    """``audio`` through ``pipeline``'s listening stage and a :class:`Conversation`, then
    ``tail_s`` of fake time (silence) for the last answers to play out. ``over_moi(t)``: the
    echo canceller's verdict at fake time ``t`` (None: no canceller). ``stop_at``: Stop is
    pressed then. ``echo``: a canceller for the listening stage. ``answering``: a question moi
    is answering as the recording starts (said before it), its reply playing for ``answering_s``
    more than it takes. ``piece_gap_s``: see :class:`ReplayJobs`."""
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    events: list[Event] = []
    first_sound: dict[int, float] = {}  # turn -> when its first piece went to the player
    began_before: set[int] = set()  # the reply playing as the recording starts
    player = FakePlayer(pausable)
    jobs = ReplayJobs(pipeline, clock, latency, check_latency, piece_gap_s)
    def emit(ev: Event | None) -> None:
        if ev is None:
            return
        if isinstance(ev, ReplyAudio):
            if ev.turn not in began_before:
                first_sound.setdefault(ev.turn, machine.now)
        events.append(ev)

    machine = Conversation(pipeline, jobs, emit, player, barge_in=barge_in, hears_player=hears_player)
    listener = Listener(pipeline.segmenter, pipeline.cfg, echo, clock)
    if answering is not None:  # answered 10 s before the recording starts: its reply is well under way
        machine.now = now[0] = player.now = -10.0
        machine.pending.append(Utterance(answering, ((-answering.seconds - 11.0, -11.0),)))
        machine.step(Tick(now[0]))
        for inp in jobs.run_due(now[0] + jobs.latency):
            machine.step(inp)
        assert machine.answering and player.playing, "moi did not answer the question it starts with"
        player.left += answering_s
        while jobs.due and jobs.due[0][0] <= 0.0:  # the rest of it (piece_gap_s), on time
            now[0] = jobs.due[0][0]
            player.advance(now[0])
            for inp in jobs.run_due(now[0]):
                machine.step(inp)
        now[0] = 0.0
        player.advance(0.0)
        events.clear()  # what the recording brings starts here
        began_before.update(first_sound)
        first_sound.clear()
    silence = Audio.silence(CHUNK / SPEECH_RATE)
    chunks = (Audio(audio.samples[i : i + CHUNK], SPEECH_RATE) for i in range(0, len(audio), CHUNK))
    tail = itertools.repeat(silence, int(tail_s * SPEECH_RATE / CHUNK))
    stopped = False
    for chunk in itertools.chain(chunks, [None], tail):
        if chunk is None:
            h = listener.flush()
        else:
            now[0] += chunk.seconds
            player.advance(now[0])
            h = listener.feed(chunk)
        for inp in jobs.run_due(now[0]):
            machine.step(inp)
        if over_moi is not None:
            h = replace(h, over_moi=over_moi(now[0]))
        machine.step(h)
        if stop_at is not None and not stopped and now[0] >= stop_at:
            stopped = True
            machine.step(StopReply(now[0]))
        if chunk is None:
            continue
        if machine.closed:
            break
    machine.step(InputEnded(now[0]))
    for inp in jobs.run_due(1e9):
        machine.step(inp)
    machine.step(Tick(now[0] + 1e3))
    player.advance(now[0] + 1e3)
    machine.step(Tick(now[0] + 2e3))
    return Replay(events, machine, player, first_sound)


def check_invariants(r: Replay) -> None:
    """Nothing said is lost and nobody is talked over (see cloud.conversation)."""
    ends = [e for e in r.events if isinstance(e, SpeechEnded)]
    dropped = [(d.start_t, d.end_t) for d in r.of(Dropped)]
    answered = [s for s in r.machine.answered_spans if s[0] >= 0]  # not the question moi started on
    for e in ends:
        span = (e.start_t, e.audio_t)
        n = answered.count(span) + dropped.count(span)
        assert n == 1, f"utterance {span} ({e.seconds:.2f} s) is in {n} answers or drops: {answered} {dropped}"
    # every start of speech lies in an utterance that ended
    for s in r.of(SpeechStarted):
        assert any(e.start_t <= s.audio_t <= e.audio_t for e in ends), f"speech at {s.audio_t} has no utterance"
    # a reply's first piece never plays while the person speaks, nor before their turn ended
    speaking = []  # (from, to) in the machine's time
    start = None
    for e in r.events:
        if isinstance(e, SpeechStarted) and start is None:
            start = e.t
        elif isinstance(e, SpeechEnded) and not e.forced and start is not None:
            speaking.append((start, e.t))
            start = None
    if start is not None:
        speaking.append((start, 1e9))
    for turn, t in r.first_sound.items():
        assert not any(a <= t < b for a, b in speaking), f"turn {turn}'s reply began at {t:.2f} s while the person spoke"
