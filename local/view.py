"""The terminal live view (rich): meters before/after VAD, the reply's waveform, the chat,
per-stage timings, the engine in use, and the Stop key.

:class:`ViewState` folds events into what is shown (no drawing) and counts them (``version``);
:func:`render` draws a state. ``local.run`` redraws on its main thread when the state changed, at
most 15 times a second, so drawing never slows the audio path however fast events arrive, and
costs nothing while nothing happens.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from cloud.meter import FLOOR_DB
from shared.events import (
    Dropped,
    ErrorEvent,
    Event,
    FallbackUsed,
    MeterTick,
    ReplyAudio,
    ReplyPaused,
    ReplyStopped,
    ReplyWithdrawn,
    ReplyText,
    ReplyToken,
    SpeechEnded,
    SpeechStarted,
    Status,
    Transcript,
    TurnDone,
)

TIMING_LABELS = {
    "stt": "stt",
    "llm_first_token": "llm first token",
    "llm": "llm",
    "tts_first": "tts first piece",
    "first_audio": "end of speech → first audio",
    "total": "total",
}


def format_timings(timings: dict[str, float]) -> str:
    return " · ".join(f"{TIMING_LABELS.get(k, k)} {v:.2f}s" for k, v in timings.items())


BARS = " ▁▂▃▄▅▆▇█"
DB_RANGE = (-70.0, 0.0)


def bars(levels_db, width: int) -> str:
    """A scrolling waveform: one block per tick, height by dBFS in DB_RANGE."""
    lo, hi = DB_RANGE
    values = list(levels_db)[-width:]
    out = []
    for db in values:
        frac = 0.0 if db <= lo else min(1.0, (db - lo) / (hi - lo))
        out.append(BARS[round(frac * (len(BARS) - 1))])
    return "".join(out).rjust(width)


@dataclass
class Line:
    who: str  # "you" | "moi" | "note"
    text: str
    turn: int | None = None


@dataclass
class ViewState:
    width: int = 64
    pre: deque = field(default_factory=lambda: deque(maxlen=400))
    aec: deque = field(default_factory=lambda: deque(maxlen=400))  # empty unless a canceller runs
    post: deque = field(default_factory=lambda: deque(maxlen=400))
    reply: deque = field(default_factory=lambda: deque(maxlen=400))
    lines: deque = field(default_factory=lambda: deque(maxlen=12))
    listening: bool = False
    speaking: bool = False
    engine: str = "local"
    overflows: int = 0
    timings: str = ""
    decision: str = ""  # how the last turn's end was judged: the silence waited, Smart Turn's P(done)
    version: int = 0  # events applied: what was drawn is stale when this moved

    def apply(self, ev: Event) -> None:
        self.version += 1
        if isinstance(ev, MeterTick):
            {"pre": self.pre, "aec": self.aec, "post": self.post}[ev.stage].append(ev.rms_db)
            if ev.stage == "post" and not self.speaking:
                self.reply.append(FLOOR_DB)
        elif isinstance(ev, Status):
            self.listening, self.speaking, self.engine, self.overflows = ev.listening, ev.speaking, ev.engine, ev.overflows
        elif isinstance(ev, SpeechStarted):
            self.listening = True
        elif isinstance(ev, SpeechEnded):
            self.listening = False
            p = f", P(done) {ev.turn_p:.2f}" if ev.turn_p is not None else ""
            self.decision = f"turn decided after {ev.waited:.2f}s of silence{p}"
        elif isinstance(ev, Transcript):
            self.lines.append(Line("you", ev.text or "(nothing intelligible)", ev.turn))
        elif isinstance(ev, ReplyToken):
            last = self.lines[-1] if self.lines else None
            if last is not None and last.who == "moi" and last.turn == ev.turn:
                last.text += ev.text
            else:
                self.lines.append(Line("moi", ev.text.lstrip(), ev.turn))
        elif isinstance(ev, ReplyText) and ev.cancelled:
            self.lines.append(Line("note", "(reply stopped)", ev.turn))
        elif isinstance(ev, Dropped) and ev.reason != "too short":  # a blip is no news
            self.lines.append(Line("note", f"(not heard: {ev.reason})", 0))
        elif isinstance(ev, ReplyAudio):
            samples = ev.audio.samples
            step = max(1, ev.audio.sample_rate // 20)
            for i in range(0, len(samples), step):
                chunk = samples[i : i + step]
                rms = float(np.sqrt(np.mean(np.square(chunk)))) if len(chunk) else 0.0
                self.reply.append(20 * np.log10(rms) if rms > 0 else FLOOR_DB)
        elif isinstance(ev, TurnDone):
            self.engine = ev.engine
            decided = f"{self.decision} · " if self.decision else ""
            self.timings = f"turn {ev.turn} · {ev.engine}: {decided}{format_timings(ev.timings)}"
        elif isinstance(ev, ReplyStopped):
            self.lines.append(Line("note", f"(stopped by {ev.reason} in {ev.latency * 1000:.0f} ms)", ev.turn))
        elif isinstance(ev, ReplyPaused):
            self.lines.append(Line("note", "(paused: someone there?)" if ev.paused else "(went on: nobody)", ev.turn))
        elif isinstance(ev, ReplyWithdrawn):
            self.lines.append(Line("note", "(withdrawn: answered again with what you say next)", ev.turn))
        elif isinstance(ev, FallbackUsed):
            self.engine = ev.engine
            self.lines.append(Line("note", f"({ev.engine}: {ev.reason})", ev.turn))
        elif isinstance(ev, ErrorEvent):
            self.lines.append(Line("note", f"error: {ev.message}", ev.turn))


def render(state: ViewState, hint: str = "Stop: space/Enter · quit: q or Ctrl-C"):
    w = state.width
    head = Text.assemble(
        ("moi ", "bold"),
        (f"· {state.engine} ", "cyan"),
        ("· listening ● " if state.listening else "· listening ○ ", "green" if state.listening else "dim"),
        ("· speaking ● " if state.speaking else "· speaking ○ ", "magenta" if state.speaking else "dim"),
        (f"· overflows {state.overflows}", "red" if state.overflows else "dim"),
    )
    meters = Text()  # lines of Text, not a Table: half the cost of a redraw
    tracks = [("before VAD", state.pre, "yellow"), ("after VAD", state.post, "green"), ("reply", state.reply, "magenta")]
    if state.aec:
        tracks.insert(1, ("echo gone", state.aec, "dark_orange"))
    for i, (label, values, style) in enumerate(tracks):
        last = values[-1] if values else FLOOR_DB
        meters.append(("\n" if i else "") + f"{label:<10} ", style="dim")
        meters.append(bars(values, w), style=style)
        meters.append(f" {last:5.0f} dB" if last > FLOOR_DB else "    -∞ dB")
    chat = Text()
    for line in state.lines:
        if line.who == "note":
            chat.append(f"     {line.text}\n", style="dim italic")
        else:
            chat.append(f"{line.who}: ", style="bold cyan" if line.who == "you" else "bold magenta")
            chat.append(line.text.strip() + "\n")
    return Panel(Group(head, meters, chat, Text(state.timings, style="dim")), subtitle=hint, subtitle_align="right")


class KeyReader:
    """Reads single keys from a terminal on a thread: Stop on space/Enter, quit on q."""

    def __init__(self, on_stop: Callable[[], None], on_quit: Callable[[], None]) -> None:
        self.on_stop, self.on_quit = on_stop, on_quit
        self._thread: threading.Thread | None = None
        self._old = None

    def start(self) -> KeyReader:
        if not sys.stdin.isatty():
            return self
        import termios
        import tty

        fd = sys.stdin.fileno()
        self._old = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._thread = threading.Thread(target=self._read, name="moi-keys", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        fd = sys.stdin.fileno()
        while True:
            try:
                key = os.read(fd, 1)
            except OSError:
                return
            if key in (b" ", b"\n", b"\r"):
                self.on_stop()
            elif key in (b"q", b"Q", b"\x03", b""):
                self.on_quit()
                return

    def close(self) -> None:
        if self._old is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._old)
            self._old = None
