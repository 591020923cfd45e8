"""A live conversation: microphone in, speaker out, barge-in and Stop.

Three threads: capture (source → meters → VAD, never blocked by the models), a turn worker
(STT → LLM → TTS, handing each reply piece to the player as soon as it exists), and the
caller's, which reads :attr:`LiveSession.events` to draw a view.

Barge-in modes, because a laptop's microphone hears its own speaker:
- ``auto`` (the default: laptop speakers with an echo canceller): the VAD listens to the
  microphone after :mod:`local.echo` took moi's voice out, and acts as ``full`` once the
  canceller has converged (``EchoCanceller.converged``) and for speech that is a person, not
  moi's residual echo (``EchoCanceller.near_end``); before that, and with no canceller
  (``pipeline.echo`` is None), it acts as ``half``. Where AEC3 holds a person down at first,
  the canceller may be sure that someone is there before the VAD hears them
  (``EchoCanceller.someone``): the reply pauses then, and goes on after HOLD_S if the VAD hears
  nobody (a cough, a door). Where the VAD and the canceller agree that a person talks over the
  reply, it pauses too, and stops once the person has talked on for CONFIRM_S or Whisper finds
  words in what they said; if it finds none, the reply goes on where it paused (a false
  barge-in: the echo's path moved and moi's own voice got through, measured live).
- ``half`` (safe on laptop speakers without a canceller): half-duplex. While moi is answering,
  the microphone's speech is shown but not acted on, so moi's own voice never starts a turn or
  cuts itself off. Stop (key or button) still cuts the reply. A source that cannot hear the
  speaker (a file played in real time, ``hears_player=False``) is not muted: its utterances
  wait their turn instead.
- ``full`` (headsets): speech from the user while moi answers stops playback at once, cancels
  the rest of the reply (LLM generation and pending TTS), and becomes the next turn.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from local.audio_io import Player
from local.pipeline import Pipeline
from shared.engine import Stopwatch
from shared.audio import Audio
from shared.errors import MoiError
from shared.events import ErrorEvent, Event, ReplyAudio, ReplyPaused, ReplyStopped, SpeechEnded, SpeechStarted, Status

BARGE_IN_MODES = ("auto", "half", "full")
# A reply paused for someone the VAD has not heard goes on after this. Once moi is silent AEC3
# has nothing to hold a person down for: the VAD hears them within 0.1-0.2 s (bench/echo.py).
HOLD_S = 0.5
# ...and nothing pauses it again for REST_S: a sound that goes on (a fan switched on) is by then
# part of the room the canceller measures someone against (local.echo.FLOOR_S)
REST_S = 3.0
# A barge-in (auto) stops the reply once the person's utterance has gone on this long, or ended
# with words in it. moi's own voice, let through where the echo's path moved mid-reply, made
# utterances of 0.66-0.72 s (padding included; the VAD's start to its end 0.53-0.55 s, live
# runs 29 and 33) that Whisper found no words in; a person talking over moi says a sentence.
CONFIRM_S = 1.0
log = logging.getLogger("moi.live")


class LiveSession:
    def __init__(
        self,
        pipeline: Pipeline,
        source: Iterable[Audio],
        player: Player | None = None,
        *,
        barge_in: str = "auto",
        hears_player: bool = True,
        status_every_s: float = 0.1,
    ) -> None:
        if barge_in not in BARGE_IN_MODES:
            raise MoiError(f"unknown barge-in mode {barge_in!r}: use auto (echo cancelled), half (speakers) or full (headset)")
        self.pipeline = pipeline
        self.source = source
        self.player = player
        self.barge_in = barge_in
        self.hears_player = hears_player  # a microphone near the speaker: half-duplex mutes it
        self.status_every_s = status_every_s
        self.events: queue.Queue[Event | None] = queue.Queue()  # None: the session ended
        self.clock = Stopwatch()
        self.reply_audio: list[ReplyAudio] = []
        self._utterances: queue.Queue[Audio | None] = queue.Queue()
        self._busy = threading.Event()  # a turn is being answered (or its audio played)
        self._done = threading.Event()  # close(): stop now, queued turns included
        self._finished = threading.Event()  # the source ended and every queued turn was answered
        self._threads: list[threading.Thread] = []
        self._turn = 0
        self._muted = False  # the utterance under way is not acted on
        self._talking = threading.Event()  # an utterance under way will be queued when it ends
        self._joining = threading.Event()  # the turn worker waits for the rest of what is queued
        self._paused_at: float | None = None  # when the reply was paused for someone (_pause_for_someone)
        self._rest_until = 0.0  # no pause for someone before this (monotonic): REST_S after one that found nobody
        self._barge_at: float | None = None  # when the paused reply's barge-in was heard, not yet confirmed
        # its utterance, ended before CONFIRM_S, and whether Whisper found words in it (to come);
        # the utterances that end meanwhile wait for the answer
        self._confirming: tuple[Audio, Future[bool]] | None = None
        self._after_confirm: list[Audio] = []
        self._confirmer: ThreadPoolExecutor | None = None
        # a turn may start at a pause, before it is decided, while nothing else is answered (nor
        # waits for the rest of that utterance: it will be answered with what came before)
        pipeline.may_speculate = lambda: not self._muted and not self.answering and not self._joining.is_set()

    # --- control -----------------------------------------------------------------------

    @property
    def answering(self) -> bool:
        return self._busy.is_set() or (self.player is not None and self.player.playing)

    @property
    def full_duplex(self) -> bool:
        """Whether speech over a reply cuts it now (see the module's barge-in modes)."""
        if self.barge_in == "auto":  # a source that cannot hear the player waits its turn
            echo = self.pipeline.echo
            return self.hears_player and echo is not None and getattr(echo, "converged", True)
        return self.barge_in == "full"

    def stop_reply(self, reason: str = "stop", trigger: float | None = None) -> None:
        """Cut the current reply: playback now, generation and pending TTS at the next step."""
        if not self.answering:
            return
        trigger = trigger if trigger is not None else time.monotonic()
        self.pipeline.cancel.set()
        if self.player is not None:
            self.player.stop()
        self.events.put(ReplyStopped(self.clock(), self._turn, reason, time.monotonic() - trigger))

    def start(self) -> LiveSession:
        for target, name in ((self._capture, "moi-capture"), (self._answer, "moi-turns")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        self._done.set()
        self.pipeline.cancel.set()
        self.pipeline.drop_speculation()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        if self.player is not None:
            self.player.stop()
        self._utterances.put(None)
        for t in self._threads:
            t.join(timeout=5)
        if self._confirmer is not None:
            self._confirmer.shutdown(wait=False, cancel_futures=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Until the session is over: closed, or its source ended and every turn was answered."""
        return self._finished.wait(timeout)

    # --- threads -----------------------------------------------------------------------

    def _capture(self) -> None:
        next_status = 0.0
        held = False  # muted because it sounded like moi's own echo: judged again as it goes on
        ended = False  # the last item ended an utterance: its audio comes next, if it was long enough
        try:
            for item in self.pipeline.listen(self.source, self.clock):
                if self._done.is_set():
                    break
                if ended and not isinstance(item, Audio):  # the utterance ended too short: nothing queued
                    self._talking.clear()
                    if self._barge_at is not None and self._confirming is None:  # a blip: nobody
                        self._barge_at = None
                        self._go_on()
                ended = isinstance(item, SpeechEnded)
                if isinstance(item, Audio):
                    if self._muted:
                        continue  # moi's own voice, or speech over it: shown, not acted on
                    if self._confirming is not None:
                        self._after_confirm.append(item)
                        continue
                    if self._barge_at is not None:  # ended before CONFIRM_S: are there words in it?
                        self._confirm(item)
                        continue
                    self._utterances.put(item)
                    self._talking.clear()  # after the put: the turn worker sees it queued
                    continue
                if isinstance(item, SpeechStarted):
                    own = self._own_echo()
                    self._muted = self.answering and self.hears_player and (not self.full_duplex or own)
                    held = self._muted and self.full_duplex and own
                    if not self._muted:
                        self._talking.set()
                    if self.answering and self.full_duplex and not own:
                        self._barge_in()
                elif isinstance(item, SpeechEnded):
                    held = False  # over, and moi's own: dropped (a later person is no barge-in into it)
                elif held and self.answering and self.full_duplex and not self._own_echo():
                    # moi's residual echo started the utterance, or a person did whom the
                    # canceller has not let through for long enough yet (EchoCanceller.near_end):
                    # the VAD sees one utterance, so only the canceller can tell that a person
                    # is in it, and once it does, they are
                    self._muted = held = False
                    self._talking.set()
                    self._barge_in()
                self.events.put(item)
                self._pause_for_someone()
                if self.clock() >= next_status:
                    next_status = self.clock() + self.status_every_s
                    self.events.put(self._status())
        except Exception as exc:  # noqa: BLE001 - the device went away, or worse: say so and end
            log.debug("listening failed", exc_info=exc)
            self.events.put(ErrorEvent(self.clock(), str(exc) if isinstance(exc, MoiError) else f"listening failed: {exc!r}"))
        finally:  # the source ended (or failed): answer what is queued, then end
            self._talking.clear()
            self._utterances.put(None)

    def _answer(self) -> None:
        """The turn worker: one utterance after another. Nothing ends it but the session: a turn
        that fails becomes an error event, and the end-of-session signal always goes out."""
        try:
            while True:
                utterance = self._utterances.get()
                if utterance is None:
                    break
                utterance, last = self._joined(utterance)
                if self._done.is_set():  # closed while it waited for the rest
                    break
                self._busy.set()
                try:
                    self._turn = self.pipeline.turns + 1
                    for ev in self.pipeline.turn(utterance, self.clock):
                        if isinstance(ev, ReplyAudio):
                            self.reply_audio.append(ev)
                            if self.player is not None and not self.pipeline.cancel.is_set():
                                self.player.play(ev.audio)
                        self.events.put(ev)
                        if self._done.is_set():
                            break
                except Exception as exc:  # noqa: BLE001 - e.g. the player failed: report it, take the next turn
                    log.debug("turn %d failed", self._turn, exc_info=exc)
                    self.events.put(ErrorEvent(self.clock(), f"turn failed: {exc!r}", self._turn))
                finally:
                    self._busy.clear()
                if last:
                    break
        finally:
            self._finished.set()
            self.events.put(None)

    def _joined(self, utterance: Audio) -> tuple[Audio, bool]:
        """The utterance to answer next, and whether the session ends after it. When the person
        is talking on as its turn would start (a barge-in whose words a pause cut in two, while
        the reply it cut was still stopping; speech queued behind a turn), what they said waits
        for the rest, and all of it is one turn: answering the first half would talk over the
        second, and a Stop between them would be lost."""
        if not self._talking.is_set():
            return utterance, False
        parts, last = [utterance], False
        self._joining.set()
        try:
            while not last and not self._done.is_set():
                try:  # the rest comes when they pause (talking then clears), with anything queued before it
                    item = self._utterances.get(timeout=0.02)
                except queue.Empty:
                    if self._talking.is_set():
                        continue
                    break
                if item is None:
                    last = True
                else:
                    parts.append(item)
        finally:
            self._joining.clear()
        return (parts[0] if len(parts) == 1 else Audio.concat(parts)), last

    def _pause_for_someone(self) -> None:
        """``auto``: a paused reply's decision, and the pause itself the moment the canceller is
        sure someone is there (``EchoCanceller.someone``), which can be 0.3 s before AEC3 lets
        the VAD hear them. The VAD then decides: a person is a barge-in (``_barge_in``), and if
        it hears nobody within HOLD_S the reply goes on where it paused, and for REST_S nothing
        pauses it again. Called by the capture thread, the only one that changes this state."""
        if self._confirming is not None and self._confirming[1].done():
            self._confirmed()
        if self._paused_at is not None:
            if not self.player.paused:  # stopped meanwhile (Stop): a person
                self._paused_at = self._barge_at = None
            elif self._barge_at is not None:  # the VAD heard a person: still talking?
                if (self._confirming is None and time.monotonic() - self._barge_at >= CONFIRM_S
                        and self.pipeline.segmenter.speaking):
                    self._stop_for_barge_in()
            elif time.monotonic() - self._paused_at >= HOLD_S and not self.pipeline.segmenter.speaking:
                self._go_on()
            return
        echo = self.pipeline.echo if self.barge_in == "auto" else None
        if echo is None or not hasattr(echo, "someone") or not hasattr(self.player, "pause"):
            return
        if echo.someone() and time.monotonic() >= self._rest_until and self.player.playing and self.full_duplex:
            self.player.pause()
            self._paused_at = time.monotonic()
            self.events.put(ReplyPaused(self.clock(), self._turn, True))

    def _barge_in(self) -> None:
        """A person talks over the reply (the VAD hears speech, the canceller says it is not
        moi's echo). ``auto`` with a player that can pause: pause it, and let CONFIRM_S or
        Whisper decide (``_pause_for_someone``, ``_confirm``); otherwise stop it now."""
        if self.barge_in != "auto" or not hasattr(self.player, "pause") or not self.player.playing:
            self.stop_reply("barge-in", trigger=time.monotonic())
            return
        self._barge_at = time.monotonic()
        if self._paused_at is None:
            self.player.pause()
            self._paused_at = self._barge_at
            self.events.put(ReplyPaused(self.clock(), self._turn, True))

    def _stop_for_barge_in(self) -> None:
        """The paused reply's barge-in is a person: stop it (the speaker went quiet at the pause)."""
        self._paused_at = self._barge_at = None
        self.stop_reply("barge-in")

    def _go_on(self) -> None:
        """The paused reply goes on where it paused: nobody was there; for REST_S nothing
        pauses it again for someone."""
        self.player.resume()
        self._paused_at, self._rest_until = None, time.monotonic() + REST_S
        self.events.put(ReplyPaused(self.clock(), self._turn, False))

    def _confirm(self, utterance: Audio) -> None:
        """A barge-in's utterance that ended before CONFIRM_S: Whisper looks for words in it on
        a thread of its own (a few hundred ms; the capture never waits), and the capture
        thread takes its answer (``_confirmed``)."""
        if self._confirmer is None:
            self._confirmer = ThreadPoolExecutor(1, thread_name_prefix="moi-confirm")
        self._confirming = (utterance, self._confirmer.submit(self._has_words, utterance))

    def _has_words(self, utterance: Audio) -> bool:
        try:
            text = self.pipeline.engine.transcribe(utterance, language=self.pipeline.cfg.stt.language).text
        except Exception as exc:  # noqa: BLE001 - cannot tell: a person, as without the check
            log.debug("confirming a barge-in failed", exc_info=exc)
            return True
        return any(c.isalnum() for c in text)

    def _confirmed(self) -> None:
        """Words: a person (the reply stops, the utterance is the next turn). None: moi's own
        voice (the reply goes on where it paused)."""
        (utterance, words), self._confirming = self._confirming, None
        self._barge_at = None
        if words.result():
            if self._paused_at is not None:
                self._stop_for_barge_in()
            self._utterances.put(utterance)
        elif self._paused_at is not None:
            self._go_on()
        for later in self._after_confirm:
            self._utterances.put(later)
        self._after_confirm.clear()
        if not self.pipeline.segmenter.speaking:
            self._talking.clear()

    def _own_echo(self) -> bool:
        """Whether what the microphone hears now is moi's own residual echo rather than a person
        (``auto`` with a canceller only: :meth:`local.echo.EchoCanceller.near_end`)."""
        echo = self.pipeline.echo if self.barge_in == "auto" else None
        return echo is not None and not getattr(echo, "near_end", lambda: True)()

    def _status(self) -> Status:
        overflows = getattr(self.source, "overflows", 0)
        return Status(self.clock(), self.pipeline.segmenter.speaking, self.answering, self.pipeline.engine.name, overflows)
