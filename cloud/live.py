"""A live session: the conversation state machine (:mod:`cloud.conversation`) on real threads.

- **capture**: the source (a microphone, a file played in real time) through the listening
  stage (:class:`cloud.pipeline.Listener`: meters, echo canceller, VAD, Smart Turn), one
  :class:`~cloud.conversation.Heard` a chunk into the machine's inbox; never blocked by a model;
- **machine**: takes the inbox in order and steps :class:`~cloud.conversation.Conversation`;
  a :class:`~cloud.conversation.Tick` when nothing came for 50 ms;
- **answer** and **check** workers: the models, one job at a time each, reporting back into
  the inbox;
- the caller's, which reads :attr:`LiveSession.events` to draw a view (``None``: it is over).

``close`` (Ctrl-C, ``q``, the page's End) reaches every one of them: the source is closed, the
reply stopped, the work in progress cancelled, and each thread joined; it returns within ~2 s
whatever the session was doing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

from cloud.conversation import (
    BARGE_IN_MODES,
    Answer,
    Check,
    Checked,
    Conversation,
    Input,
    InputEnded,
    JobEnded,
    Output,
    Player,
    Quit,
    Respond,
    Said,
    StopReply,
    Tick,
    Utterance,
)
from cloud.pipeline import Canceller, Listener, Pipeline
from shared.audio import Audio
from shared.engine import Stopwatch, name_os_thread
from shared.errors import MoiError
from shared.events import ErrorEvent, Event, MeterTick, ReplyAudio

__all__ = ["BARGE_IN_MODES", "LiveSession", "Worker"]
log = logging.getLogger("moi.live")
CLOSE_S = 1.5  # close() waits this long in all for the threads to end
# While nobody speaks and nothing plays, a source that can (local.audio_io.MicSource.hold_s)
# hands over what gathered in this many seconds as one chunk: one wake-up and one pass of the
# listening stage for twelve VAD windows (a wake costs more than the windows: Silero's first
# window after a sleep takes ~0.9 ms against ~0.13 warm). The conversation thread wakes with it;
# a person's first words are seen up to this much later, their end is not. A view's meters move
# in steps of this while nothing happens (every tick still comes), and smoothly from the first word.
IDLE_HOLD_S = 0.384


class Worker:
    """One daemon thread running jobs in order; ``close`` ends it after the job in progress."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        name_os_thread()
        while (job := self._jobs.get()) is not None:
            job()

    def close(self) -> None:
        self._jobs.put(None)


class LiveSession:
    def __init__(
        self,
        pipeline: Pipeline,
        source: Iterable[Audio],
        player: Player | None = None,
        *,
        barge_in: str = "auto",
        hears_player: bool = True,
        echo: Canceller | None = None,
        meters: bool = True,
        auto_answer: bool = True,
        on_event: Callable[[Event | None], None] | None = None,
    ) -> None:
        """``on_event``: every event goes to it, on the machine's thread, in order, instead of to
        :attr:`events` (a Realtime connection translates them as they happen)."""
        self.pipeline = pipeline
        self.meters = meters  # MeterTick events for a view that draws them (else dropped here)
        self.source = source
        self.player = player
        self.echo = echo
        self.clock = Stopwatch()
        self.events: queue.Queue[Event | None] = queue.Queue()  # None: the session ended
        self.reply_audio: list[ReplyAudio] = []  # without on_event: what was played, for the caller
        self.on_event = on_event
        self._inbox: queue.Queue[Input] = queue.Queue()
        self.listener = Listener(pipeline.segmenter, pipeline.cfg, echo, self.clock, meters=meters)
        self.machine = Conversation(pipeline, self, self._emit, player, barge_in=barge_in, hears_player=hears_player,
                                    auto_answer=auto_answer)
        self._closing = threading.Event()
        self._over = threading.Event()  # the machine emitted its end
        self._answers: Worker | None = None
        self._checks: Worker | None = None
        self._threads: list[threading.Thread] = []

    # --- what the caller uses ----------------------------------------------------------------

    @property
    def answering(self) -> bool:
        return self.machine.answering

    @property
    def turns(self) -> int:
        return self.machine.turns

    def start(self) -> LiveSession:
        self._answers, self._checks = Worker("moi-answer"), Worker("moi-check")
        for target, name in ((self._capture, "moi-capture"), (self._drive, "moi-conversation")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop_reply(self, reason: str = "stop") -> None:
        """Cut the current reply (Stop: a key, the page's button)."""
        self._inbox.put(StopReply(self.clock(), reason))

    def said(self, utterance: Utterance) -> None:
        """An utterance the caller cut (a Realtime client's commit)."""
        self._inbox.put(Said(self.clock(), utterance))

    def respond(self) -> None:
        """Answer now what is pending (or the waiting typed message)."""
        self._inbox.put(Respond(self.clock()))

    def close(self) -> None:
        """End the session now (see the module): every thread it started is joined."""
        deadline = time.monotonic() + CLOSE_S
        self._closing.set()
        self._inbox.put(Quit(self.clock()))
        close = getattr(self.source, "close", None)  # sources without one end with their last chunk
        if close is not None:
            close()
        if self.player is not None:
            self.player.stop()
        for w in (self._answers, self._checks):
            if w is not None:
                w.close()
        threads = self._threads + [w.thread for w in (self._answers, self._checks) if w is not None]
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        left = [t.name for t in threads if t.is_alive()]
        if left:  # a model call that cannot be cut (a Whisper pass) ends on its own; the threads are daemons
            log.debug("threads still ending after close: %s", ", ".join(left))

    def wait(self, timeout: float | None = None) -> bool:
        """Until the session is over: closed, or its source ended and every turn was answered."""
        return self._over.wait(timeout)

    # --- Jobs, for the machine -----------------------------------------------------------------

    def answer(self, job: Answer) -> None:
        assert self._answers is not None

        def run() -> None:
            try:
                if job.cancel.is_set() or self._closing.is_set():
                    return
                audio = job.utterance.audio if job.utterance is not None else Audio.silence(0.0)  # typed: request.text
                for ev in self.pipeline.answer(audio, job.request, job.cancel, self.clock):
                    self._inbox.put(Output(self.clock(), job.id, ev))
                    if self._closing.is_set():
                        job.cancel.set()
            except Exception as exc:  # noqa: BLE001 - pipeline.answer reports failures; this is a bug's last stop
                log.debug("answer %d failed", job.id, exc_info=exc)
                self._inbox.put(Output(self.clock(), job.id, ErrorEvent(self.clock(), f"turn failed: {exc!r}",
                                                                        job.request.turn)))
            finally:
                self._inbox.put(JobEnded(self.clock(), job.id))

        self._answers.submit(run)

    def check(self, job: Check) -> None:
        assert self._checks is not None

        def run() -> None:
            self._inbox.put(Checked(self.clock(), job.id, self._has_words(job.utterance.audio)))

        self._checks.submit(run)

    def _has_words(self, audio: Audio) -> bool:
        if self._closing.is_set():
            return False
        try:
            return self.pipeline.has_words(audio)
        except Exception as exc:  # noqa: BLE001 - cannot tell: a person, as without the check
            log.debug("confirming a barge-in failed", exc_info=exc)
            return True

    # --- threads -----------------------------------------------------------------------------

    def _emit(self, ev: Event | None) -> None:
        if not self.meters and isinstance(ev, MeterTick):
            return
        if self.on_event is not None:
            self.on_event(ev)
        else:
            if isinstance(ev, ReplyAudio):
                self.reply_audio.append(ev)
            self.events.put(ev)
        if ev is None:
            self._over.set()

    def _idle(self) -> bool:
        """Nobody speaks, nothing is being answered or played."""
        playing = self.player is not None and self.player.playing
        return not (self.listener.segmenter.speaking or self.machine.answering or playing)

    def _capture(self) -> None:
        name_os_thread()
        error = None
        holds = hasattr(self.source, "hold_s")
        try:
            for chunk in self.source:
                if self._closing.is_set():
                    return
                self._inbox.put(self.listener.feed(chunk, getattr(self.source, "captured_at", 0.0),
                                                   getattr(self.source, "overflows", 0)))
                if holds:
                    self.source.hold_s = IDLE_HOLD_S if self._idle() else 0.0
            self._inbox.put(self.listener.flush())
        except Exception as exc:  # noqa: BLE001 - the device went away, or worse: say so and end
            log.debug("listening failed", exc_info=exc)
            error = str(exc) if isinstance(exc, MoiError) else f"listening failed: {exc!r}"
        finally:
            self._inbox.put(InputEnded(self.clock(), error))

    def _drive(self) -> None:
        name_os_thread()
        machine = self.machine
        try:
            while not machine.closed:
                try:
                    # while the microphone holds its blocks, they wake the machine: no ticks between
                    inp = self._inbox.get(timeout=getattr(self.source, "hold_s", 0.0) or 0.05)
                except queue.Empty:
                    inp = Tick(self.clock())
                machine.step(inp)
        except Exception as exc:  # noqa: BLE001 - a bug in the machine: say so, and end the session
            log.debug("the conversation failed", exc_info=exc)
            self._emit(ErrorEvent(self.clock(), f"the conversation failed: {exc!r}"))
            self._emit(None)
            self._closing.set()
