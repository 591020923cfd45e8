"""Live turn-taking as one state machine: who talks when, and what happens to what was said.

:class:`Conversation` is driven by one thread from timestamped inputs (:class:`Heard` for each
microphone chunk through the listening stage, the answer workers' :class:`Output`, Stop, Quit,
the end of the input). It never reads a clock and never sleeps, so a recording can be replayed
through it chunk by chunk on a fake clock (``tests/replay.py``). The models run on workers it
starts and cancels (:class:`Jobs`); the player is told what to do through :class:`Player`.

States (``state``; every change is a :class:`~shared.events.StateChanged` event):

========== ==================================================================================
listening  nobody speaks, nothing is being answered
speaking   the person speaks; nothing of moi is audible
deciding   the person paused: has their turn ended? (Smart Turn); a reply may be prepared on
           speculation, held back until the turn is decided
answering  a decided turn is answered: its reply prepared, then played
paused     the reply is paused for someone talking over it: a person stops it, nobody resumes it
stopping   the reply was stopped (Stop, or a confirmed barge-in): waiting for its work to end
closed     Quit, or the input ended and everything said was answered
========== ==================================================================================

Invariants (tested on replays):

- **Nothing said is lost.** Every utterance the VAD cuts is owned by the machine from then on
  (``pending``) until it is handed to STT as part of exactly one answered turn, or a
  :class:`~shared.events.Dropped` event says why not (too short, no words, moi's own voice,
  said over moi in half-duplex). Joining, retracting and pausing only move utterances.
- **No talking over.** A reply is decided only once the person's turn ended; while nothing of
  it is audible yet, speech withdraws it (its utterance goes back, and the person's next words
  join it); once audible, speech over it pauses it (``auto``) or stops it (``full``).

Barge-in modes: ``auto`` (an echo canceller takes moi's voice out of the microphone; until it
is trusted, and without one, ``half``), ``half`` (speech over moi's voice from a microphone
that hears the speaker is dropped, said so), ``full`` (headsets: speech over moi stops it).
A source that cannot hear the player (a file played in real time) waits its turn, except in
``full``.

A Realtime connection (cloud/realtime.py) drives the same machine from a socket: utterances the
client cuts itself come as :class:`Said`; with ``auto_answer`` off a turn waits for
:class:`Respond` (``response.create``), which with nothing pending answers the thread's waiting
typed message. Every decided turn is a :class:`~shared.events.TurnStarted` event, every reply
taken back a :class:`~shared.events.ReplyWithdrawn`.

Why one long module (~700 lines): the machine's transitions only make sense read together, and
its inputs and parts (~200 lines of small types) are what its one thread is stepped with.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from cloud.vad import SpeechEnd, SpeechPause, SpeechResume, SpeechStart
from shared.audio import Audio
from shared.engine import TurnRequest
from shared.errors import MoiError
from shared.events import (
    Dropped,
    ErrorEvent,
    Event,
    MeterTick,
    ReplyAudio,
    ReplyPaused,
    ReplyStopped,
    ReplyText,
    ReplyWithdrawn,
    SpeechEnded,
    SpeechStarted,
    StateChanged,
    Status,
    Transcript,
    TurnStarted,
)
from shared.messages import Message

BARGE_IN_MODES = ("auto", "half", "full")
# A reply paused for someone the VAD has not heard goes on after this. Once moi is silent AEC3
# has nothing to hold a person down for: the VAD hears them within 0.1-0.2 s (bench/echo.py).
HOLD_S = 0.5
# ...and nothing pauses it again for REST_S: a sound that goes on (a fan switched on) is by then
# part of the room the canceller measures someone against (local.echo.FLOOR_S)
REST_S = 3.0
# A barge-in (auto) stops the reply once the person's voice goes on this long after it began
# (a pause, which the VAD holds open for up to a second while it judges the turn's end, does not
# count), or their utterance ended with words in it: moi's own voice let through where the echo's
# path moved mid-reply made utterances of 0.5-0.7 s that Whisper found no words in; a person
# talking over moi says a sentence.
CONFIRM_S = 1.0
# A reply stopped by a barge-in this soon after its first sound started on a pause the person
# then talked through: it is withdrawn, and what it answered is answered again with what they
# say now (one thought, one turn), not remembered as an exchange.
REJOIN_S = 2.0
STATUS_EVERY_S = 1.0  # a Status event on every change of it, and at least this often


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverMoi:
    """What the echo canceller's side says about the microphone while moi may be playing."""

    trusted: bool = False  # the canceller has converged: speech over moi can be acted on
    person: bool = False  # a person talks over moi (local.echo.TalkOver.person)
    someone: bool = False  # something that is not moi's voice, before the VAD can tell (TalkOver.someone)


@dataclass(frozen=True)
class Heard:
    """One microphone chunk through the listening stage (cloud.pipeline.Listener)."""

    t: float
    meters: tuple[MeterTick, ...] = ()
    vad: tuple[SpeechStart | SpeechPause | SpeechResume | SpeechEnd, ...] = ()
    speaking: bool = False  # the VAD's state after this chunk
    over_moi: OverMoi | None = None  # None: no echo canceller
    overflows: int = 0  # microphone blocks lost so far
    voiced: bool = False  # the chunk held voice of the utterance under way (not only its pause)


@dataclass(frozen=True)
class Output:
    """An event of answer job ``job``."""

    t: float
    job: int
    event: Event


@dataclass(frozen=True)
class JobEnded:
    t: float
    job: int


@dataclass(frozen=True)
class Checked:
    """Whether Whisper found words in a barge-in's utterance (check job ``job``)."""

    t: float
    job: int
    words: bool


@dataclass(frozen=True)
class StopReply:
    t: float
    reason: str = "stop"


@dataclass(frozen=True)
class InputEnded:
    t: float
    error: str | None = None  # the source failed: this says how


@dataclass(frozen=True)
class Said:
    """An utterance cut by the client, not by the VAD (a Realtime client's commit): owned and
    answered like one the VAD cut."""

    t: float
    utterance: Utterance


@dataclass(frozen=True)
class Respond:
    """Answer now (a Realtime client's ``response.create``): what is pending, or else the
    thread's waiting typed message."""

    t: float


@dataclass(frozen=True)
class Quit:
    t: float


@dataclass(frozen=True)
class Tick:
    """Time passes (no input came): timeouts and the player's end are looked at."""

    t: float


Input = Heard | Said | Respond | Output | JobEnded | Checked | StopReply | InputEnded | Quit | Tick


# --- the parts the machine drives -----------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """What the person said, as Whisper should hear it, and where it lies in the input stream
    (one span per part: joined utterances keep every part's)."""

    audio: Audio
    spans: tuple[tuple[float, float], ...]

    @staticmethod
    def join(parts: Sequence[Utterance]) -> Utterance:
        if len(parts) == 1:
            return parts[0]
        return Utterance(Audio.concat([p.audio for p in parts]), tuple(s for p in parts for s in p.spans))


@dataclass
class Answer:
    """A turn for the answer worker: ``utterance`` through the pipeline's stages (None: a typed
    message, ``request.text``)."""

    id: int
    utterance: Utterance | None
    request: TurnRequest
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Check:
    """A barge-in's utterance for Whisper: are there words in it?"""

    id: int
    utterance: Utterance


class Jobs(Protocol):
    """Runs the machine's model work off its thread and reports back as inputs: an answer's
    events as :class:`Output` then :class:`JobEnded`; a check as :class:`Checked`. Answers run
    one at a time, in order (a cancelled one ends at its next step)."""

    def answer(self, job: Answer) -> None: ...

    def check(self, job: Check) -> None: ...


class Player(Protocol):
    """What the machine needs of a speaker. ``pausable``: ``pause`` silences it now and keeps
    the rest, and what it is given meanwhile, for ``resume`` (else a barge-in stops it)."""

    pausable: bool

    @property
    def playing(self) -> bool: ...  # holds sound to play, paused or not

    def play(self, audio: Audio) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self) -> float: ...  # silence it; returns the seconds of what it was given nobody heard


class Stages(Protocol):  # what the machine needs of cloud.pipeline.Pipeline
    variant: str
    engine_name: str

    def request(self, turn: int) -> TurnRequest: ...

    def remember(self, heard: str | None, reply: str, revising: Message | None = None) -> Message | None: ...

    def has_words(self, audio: Audio) -> bool: ...


@dataclass
class _Reply:
    job: Answer
    parts: list[Utterance]  # what it answers, as said
    turn: int
    decided: bool  # False: speculation at a pause, held back until the turn ends there
    spec_start: float | None = None  # the speculated utterance's start in the stream
    held: list[Event] = field(default_factory=list)  # a speculation's events, until decided
    audible_at: float | None = None  # when its first piece went to the player
    ended: bool = False  # its job ended
    stopping: bool = False
    heard: str | None = ""  # None: a typed message's turn
    played: list[tuple[str, float]] = field(default_factory=list)  # (text, seconds) of each piece given to the player
    remembered: Message | None = None  # the reply as the thread holds it


class Conversation:
    """The state machine (see the module). ``emit`` receives every event, in order; ``None``
    once, when the conversation is over. Only ``step`` changes it, from one thread."""

    def __init__(
        self,
        pipeline: Stages,
        jobs: Jobs,
        emit: Callable[[Event | None], None],
        player: Player | None = None,
        *,
        barge_in: str = "auto",
        hears_player: bool = True,
        auto_answer: bool = True,
    ) -> None:
        if barge_in not in BARGE_IN_MODES:
            raise MoiError(f"unknown barge-in mode {barge_in!r}: use auto (echo cancelled), half (speakers) or full (headset)")
        self.pipeline = pipeline
        self.jobs = jobs
        self.emit = emit
        self.player = player
        self.barge_in = barge_in
        self.hears_player = hears_player  # a microphone near the speaker: half-duplex drops what it hears over moi
        self.auto_answer = auto_answer  # False: a turn is answered when asked (Respond), not when it ends
        self.state = "listening"
        self.now = 0.0
        self.turns = 0  # turns decided
        self.speculated = self.dropped_speculations = 0
        self.closed = False
        self.pending: list[Utterance] = []  # said, not yet answered: the person's audio has this one owner
        self.answered_spans: list[tuple[float, float]] = []  # where what was answered lies in the input
        self._reply: _Reply | None = None
        self._ids = itertools.count(1)
        self._speaking = False  # the VAD hears the person
        self._over: OverMoi | None = None
        self._utterance = "person"  # the utterance under way: person | held (moi's echo?) | muted (half-duplex)
        self._paused_at: float | None = None  # the reply was paused for someone ...
        self._barge_at: float | None = None  # ... whom the VAD heard then, still talking (a barge-in to confirm)
        self._voiced_at = 0.0  # when the VAD last heard voice (a pause inside an utterance is not voice)
        self._rest_until = 0.0
        self._checking: Check | None = None
        self._input_ended = False
        self._next_status = 0.0
        self._status: tuple[bool, bool, int] | None = None
        self._overflows = 0
        self._asked = False  # Respond came: answer what is pending once nothing runs

    # --- what views ask --------------------------------------------------------------------

    @property
    def answering(self) -> bool:
        """A decided turn is being answered, or its reply still plays (read once: other threads
        ask)."""
        r = self._reply
        return r is not None and r.decided

    @property
    def speaking(self) -> bool:
        return self._speaking

    # --- the one entry -----------------------------------------------------------------------

    def step(self, inp: Input) -> None:
        if self.closed:
            return
        self.now = max(self.now, inp.t)
        if isinstance(inp, Heard):
            self._heard(inp)
        elif isinstance(inp, Said):
            self.pending.append(inp.utterance)
            self.pending.sort(key=lambda u: u.spans[0][0] if u.spans else 0.0)
        elif isinstance(inp, Respond):
            self._respond()
        elif isinstance(inp, Output):
            self._output(inp)
        elif isinstance(inp, JobEnded):
            if self._reply is not None and inp.job == self._reply.job.id:
                self._reply.ended = True
        elif isinstance(inp, Checked):
            self._checked(inp)
        elif isinstance(inp, StopReply):
            self.stop_reply(inp.reason, inp.t)
        elif isinstance(inp, InputEnded):
            self._input_ended = True
            if inp.error:
                self.emit(ErrorEvent(self.now, inp.error))
        elif isinstance(inp, Quit):
            self._close("quit")
            return
        self._tick()

    # --- the person ----------------------------------------------------------------------------

    def _heard(self, h: Heard) -> None:
        for m in h.meters:
            self.emit(m)
        self._over, self._overflows = h.over_moi, h.overflows
        if h.voiced:
            self._voiced_at = self.now
        for ev in h.vad:
            if isinstance(ev, SpeechStart):
                self._speaking = True
                self.emit(SpeechStarted(self.now, ev.at))
                self._speech_started()
            elif isinstance(ev, SpeechPause):
                self._paused(ev)
            elif isinstance(ev, SpeechResume):
                self._resumed()
            else:
                self._speaking = ev.forced  # a forced cut: speech goes on (its SpeechStart follows)
                self._speech_ended(ev)
        self._speaking = h.speaking
        r = self._reply
        if (self._utterance == "held" and self._speaking and r is not None and r.decided and not r.stopping
                and h.over_moi is not None and h.over_moi.person):
            # moi's echo seemed to start the utterance, or a person did whom the canceller had not
            # let through long enough: the VAD sees one utterance, only the canceller can tell a
            # person is in it, and once it does, they are
            self._utterance = "person"
            self._barge_in()
        self._pause_for_someone()
        status = (self._speaking, self.answering, self._overflows)
        if status != self._status or self.now >= self._next_status:  # on a change, else a heartbeat
            self._status, self._next_status = status, self.now + STATUS_EVERY_S
            self.emit(Status(self.now, self._speaking, self.answering, self.pipeline.engine_name, self._overflows))

    def _speech_started(self) -> None:
        self._utterance = "person"
        r = self._reply
        if r is None or not r.decided or r.stopping:
            if self.state in ("listening", "deciding"):
                self._go("speaking", "speech")
            return
        if self.pipeline.variant == "transcribe":
            return  # nothing is said back: the next utterance waits its turn
        if r.audible_at is None:
            self._retract()  # nothing of moi heard yet: they went on, and it is all one turn
            return
        if not self.hears_player:  # a file played in real time: certainly the person
            if self.barge_in == "full":
                self._barge_in()
            return  # else it waits its turn
        if self.barge_in == "half" or (self.barge_in == "auto" and not self._trusted()):
            self._utterance = "muted"
        elif self.barge_in == "full" or (self._over is not None and self._over.person):
            self._barge_in()
        else:
            self._utterance = "held"  # moi's own echo, for now: judged again as it goes on

    def _paused(self, ev: SpeechPause) -> None:
        """A pause long enough to ask: start the turn on speculation, if nothing else runs."""
        if self.state == "speaking":
            self._go("deciding", "pause")
        if (self._reply is not None or self._utterance != "person" or self._checking is not None
                or self.pipeline.variant == "transcribe"):
            return
        parts = [*self.pending, Utterance(ev.audio, ((ev.start, ev.at),))]
        self._reply = self._start(parts, decided=False)
        self._reply.spec_start = ev.start
        self.speculated += 1

    def _resumed(self) -> None:
        if self.state == "deciding":
            self._go("speaking", "speech again")
        r = self._reply
        if r is not None and not r.decided:
            self._drop_speculation()

    def _speech_ended(self, ev: SpeechEnd) -> None:
        self.emit(speech_ended(ev, self.now))
        kind, self._utterance = self._utterance, "person"
        if ev.audio is None:
            self.emit(Dropped(self.now, ev.start, ev.at, "too short"))
            if self._barge_at is not None:  # a blip over moi: nobody
                self._barge_at = None
                if self._checking is None:
                    self._go_on()
            self._after_speech()
            return
        said = Utterance(ev.audio, ((ev.start, ev.at),))
        if kind in ("muted", "held"):
            why = "said while moi spoke (half-duplex)" if kind == "muted" else "moi's own voice"
            self.emit(Dropped(self.now, ev.start, ev.at, why))
            return
        if ev.forced:  # max_utterance_s: the person talks on; one turn with what follows
            self.pending.append(said)
            return
        if self._barge_at is not None:  # ended before CONFIRM_S: words in it? (with what is being checked)
            self._barge_at = None
            if self._checking is not None:
                said = Utterance.join([self._checking.utterance, said])
            self._checking = Check(next(self._ids), said)
            self.jobs.check(self._checking)
            return
        self.pending.append(said)
        r = self._reply
        if r is not None and not r.decided:
            if r.spec_start == ev.start and len(r.parts) == len(self.pending):
                self._decide(r)  # the turn ended in the pause it was started at
            else:
                self._drop_speculation()
        self._after_speech()

    def _after_speech(self) -> None:
        if self.state in ("speaking", "deciding") and not self._speaking:
            self._go("listening" if not self.pending else "deciding", "speech ended")

    # --- moi ---------------------------------------------------------------------------------------

    def _start(self, parts: list[Utterance], decided: bool) -> _Reply:
        turn = self.turns + (0 if decided else 1)  # a speculation's turn is decided later, with this number
        job = Answer(next(self._ids), Utterance.join(parts), self.pipeline.request(turn))
        r = _Reply(job, list(parts), turn, decided)
        self.jobs.answer(job)
        return r

    def _answer(self) -> None:
        """Answer what is pending: all of it as one turn (the person has stopped), or, for
        transcripts, the oldest utterance alone (nothing is said back)."""
        if self.pipeline.variant == "transcribe":
            parts, self.pending = self.pending[:1], self.pending[1:]
        else:
            parts, self.pending = self.pending, []
        self.turns += 1
        self._asked = False
        self._reply = self._start(parts, decided=True)
        self.answered_spans += [s for p in parts for s in p.spans]
        self.emit(TurnStarted(self.now, self._reply.turn, tuple(s for p in parts for s in p.spans)))
        self._go("answering", "turn ended")

    def _respond(self) -> None:
        """Respond: what is pending is answered once nothing else runs; with nothing pending, the
        thread's waiting typed message is, now."""
        r = self._reply
        if r is not None and r.decided:
            if not r.ended or self._paused_at is not None:  # paused: someone may be talking over it
                self.emit(ErrorEvent(self.now, "a response is in progress: cancel it first"))
                return
            self._reply = None  # it only plays out: the next reply plays after it
        if self.pending:
            self._asked = True
            return
        request = self.pipeline.request(self.turns + 1)
        if not request.messages or request.messages[-1].role != "user":
            self.emit(ErrorEvent(self.now, "nothing to respond to: send audio or a user message first"))
            return
        if self._reply is not None:
            self._drop_speculation()
        self.turns += 1
        job = Answer(next(self._ids), None, replace(request, messages=request.messages[:-1],
                                                    text=request.messages[-1].content))
        self._reply = _Reply(job, [], job.request.turn, decided=True, heard=None)
        self.jobs.answer(job)
        self.emit(TurnStarted(self.now, job.request.turn))
        self._go("answering", "asked to respond")

    def _decide(self, r: _Reply) -> None:
        r.decided = True
        r.parts, self.pending = self.pending, []  # what was speculated on, as the turn's end cut it
        self.answered_spans += [s for p in r.parts for s in p.spans]
        self.turns += 1
        self.emit(TurnStarted(self.now, r.turn, tuple(s for p in r.parts for s in p.spans)))
        self._go("answering", "turn ended where it was speculated")
        held, r.held = r.held, []
        for ev in held:
            self._deliver(r, ev)

    def _drop_speculation(self) -> None:
        r = self._reply
        assert r is not None and not r.decided
        r.job.cancel.set()
        self._reply = None
        self.dropped_speculations += 1

    def _retract(self) -> None:
        """The person went on before a word of the reply was heard: it is withdrawn, and what it
        answered is theirs again, to be answered with what they say now."""
        r = self._reply
        assert r is not None
        r.job.cancel.set()
        self.pending[:0] = r.parts
        for s in (s for p in r.parts for s in p.spans):
            self.answered_spans.remove(s)
        self.turns -= 1  # nothing of it was heard: the turn that answers it all keeps its number
        self._reply = None
        self.emit(ReplyWithdrawn(self.now, r.turn))
        self._go("speaking", "the person went on before moi spoke: reply withdrawn")

    def _output(self, o: Output) -> None:
        r = self._reply
        if r is None or o.job != r.job.id:
            return  # a withdrawn or dropped answer's late word: nothing of it is shown or played
        if not r.decided:
            r.held.append(o.event)
            return
        self._deliver(r, o.event)

    def _deliver(self, r: _Reply, ev: Event) -> None:
        if isinstance(ev, Transcript):
            r.heard = ev.text
        elif isinstance(ev, ReplyText) and not r.stopping:  # a stopped reply was remembered as heard
            r.remembered = self.pipeline.remember(r.heard, ev.text)
        elif isinstance(ev, ReplyAudio):
            if r.stopping:
                return
            if self.player is not None:
                self.player.play(ev.audio)
            r.played.append((ev.text, ev.audio.seconds))
            if r.audible_at is None:
                r.audible_at = self.now
        self.emit(ev)

    def stop_reply(self, reason: str = "stop", trigger: float | None = None) -> None:
        """Cut the reply: the speaker now, generation and synthesis at their next step."""
        r = self._reply
        if r is None or not r.decided or r.stopping:
            return
        r.stopping = True
        r.job.cancel.set()
        unheard = self.player.stop() if self.player is not None else 0.0
        self._paused_at = self._barge_at = None
        trigger = self.now if trigger is None else trigger
        self.emit(ReplyStopped(self.now, r.turn, reason, max(0.0, self.now - trigger)))
        withdrawn = reason == "barge-in" and (r.audible_at is None or self.now - r.audible_at <= REJOIN_S)
        # the thread keeps what the person heard of the reply, not what was made of it (a fast
        # voice can have made all of it before the Stop); a withdrawn one, nothing
        said = "" if withdrawn else heard_part(r.played, unheard)
        r.remembered = self.pipeline.remember(r.heard, said, revising=r.remembered)
        if withdrawn:  # see REJOIN_S
            self.pending[:0] = r.parts
            for span in (s for p in r.parts for s in p.spans):
                self.answered_spans.remove(span)
            self.emit(ReplyWithdrawn(self.now, r.turn))
            self._go("stopping", "barge-in as the reply began: it is answered again with what follows")
            return
        self._go("stopping", reason)

    def _barge_in(self) -> None:
        """A person talks over the reply. ``auto`` with a player that can pause: pause it, and
        let CONFIRM_S or Whisper decide; otherwise stop it now."""
        r = self._reply
        assert r is not None
        if self.barge_in != "auto" or self.player is None or not self.player.pausable or not self._sounding(r):
            self.stop_reply("barge-in")
            return
        self._barge_at = self.now
        if self._paused_at is None:
            self._pause()

    def _pause(self) -> None:
        assert self.player is not None and self._reply is not None
        self.player.pause()
        self._paused_at = self.now
        self.emit(ReplyPaused(self.now, self._reply.turn, True))
        self._go("paused", "someone over moi")

    def _sounding(self, r: _Reply) -> bool:
        """The reply has sound to come: in the speaker, or still being made (the speaker may
        have run dry between two pieces: a pause then holds the next one back)."""
        return not r.ended or (self.player is not None and self.player.playing)

    def _go_on(self) -> None:
        """Nobody was there: the reply goes on where it paused, and for REST_S nothing pauses it
        again for someone the VAD has not heard."""
        if self._paused_at is None:
            return
        assert self.player is not None and self._reply is not None
        self.player.resume()
        self._paused_at, self._rest_until = None, self.now + REST_S
        self.emit(ReplyPaused(self.now, self._reply.turn, False))
        self._go("answering", "nobody: the reply goes on")

    def _pause_for_someone(self) -> None:
        """``auto``: pause the moment the canceller is sure someone is there, which can be 0.3 s
        before AEC3 lets the VAD hear them; the VAD then decides."""
        r, over = self._reply, self._over
        if (self.barge_in != "auto" or over is None or not over.someone or not over.trusted or not self.hears_player
                or r is None or not r.decided or r.stopping or r.audible_at is None or self._paused_at is not None
                or self.now < self._rest_until or self.player is None or not self.player.pausable
                or not self._sounding(r)):
            return
        self._pause()

    def _checked(self, c: Checked) -> None:
        job = self._checking
        if job is None or c.job != job.id:
            return
        self._checking = None
        if c.words:  # a person: the reply stops, and what they said is theirs to be answered
            self.stop_reply("barge-in")
            self.pending.append(job.utterance)
            self.pending.sort(key=lambda u: u.spans[0][0])
        else:
            for start, end in job.utterance.spans:
                self.emit(Dropped(self.now, start, end, "no words"))
            if self._barge_at is None:  # else they talk again: that utterance decides
                self._go_on()

    def _trusted(self) -> bool:
        return self._over is not None and self._over.trusted

    # --- time ------------------------------------------------------------------------------------

    def _tick(self) -> None:
        r = self._reply
        if self._paused_at is not None and r is not None:
            if self._barge_at is not None:
                if self._speaking and self._voiced_at - self._barge_at >= CONFIRM_S:
                    self.stop_reply("barge-in", self._barge_at)  # they talked on: a person
            elif self._checking is None and self.now - self._paused_at >= HOLD_S and not self._speaking:
                self._go_on()
        if r is not None and r.decided and not self._sounding(r):
            if self._paused_at is not None:  # paused as it ran dry, and nothing more came: the
                self.player.resume()         # speaker is free for the next reply; what the person
                self._paused_at = self._barge_at = None  # says now is theirs (a check under way still decides)
            self._reply = None  # answered, and its reply has played out
            self._go("speaking" if self._speaking else "listening", "reply over")
        if self._reply is None and self.pending and self._checking is None and (self.auto_answer or self._asked) and (
                not self._speaking or self.pipeline.variant == "transcribe"):
            self._answer()
        if self._input_ended and self._reply is None and not self.pending and self._checking is None:
            self._close("input ended")

    def _go(self, state: str, why: str) -> None:
        if state != self.state:
            self.state = state
            self.emit(StateChanged(self.now, state, why))

    def _close(self, why: str) -> None:
        r = self._reply
        if r is not None:
            r.job.cancel.set()
        if self.player is not None and why == "quit":
            self.player.stop()
        for u in self.pending:  # only on Quit: said, and not answered
            for start, end in u.spans:
                self.emit(Dropped(self.now, start, end, "the session ended"))
        self.pending.clear()
        self._go("closed", why)
        self.closed = True
        self.emit(None)


def heard_part(pieces: Sequence[tuple[str, float]], unheard_s: float) -> str:
    """What a person heard of a reply's ``pieces`` (text, seconds, in the order played) when its
    last ``unheard_s`` never played: the pieces that played whole, then the share of the next
    one's words that its played share of time holds (rounded down: a word cut off is not said)."""
    left, heard = sum(s for _, s in pieces) - unheard_s, []
    for text, seconds in pieces:
        if left >= seconds - 1e-3:
            heard.append(text)
            left -= seconds
            continue
        words = text.split()
        heard += words[: int(len(words) * max(0.0, left) / seconds)] if seconds > 0 else []
        break
    return " ".join(" ".join(heard).split())


def speech_ended(ev: SpeechEnd, t: float) -> SpeechEnded:
    """The event for a VAD's utterance end, stamped ``t``."""
    seconds = ev.audio.seconds if ev.audio is not None else ev.at - ev.start
    return SpeechEnded(t, ev.at, ev.start, seconds, ev.forced, ev.decided, ev.turn_p,
                       round(max(0.0, ev.decided - ev.voice_end), 3))
