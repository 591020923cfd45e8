"""Running a pipeline over a file and showing it: `you:` / `moi:` lines, or JSON events."""

from __future__ import annotations

import json
import queue
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from local.audio_io import Player
from cloud.engine import LocalEngine
from shared.engine import ROLES_FOR, Engine
from local.echo import INSTALL, EchoCanceller, canceller
from cloud.live import LiveSession
from cloud.pipeline import Pipeline, file_source, listening, reply_audio
from local.view import KeyReader, ViewState, format_timings, render
from shared.audio import Audio, decode
from shared.config import Config
from shared.events import (
    Dropped,
    ErrorEvent,
    Event,
    FallbackUsed,
    MeterTick,
    ReplyPaused,
    ReplyStopped,
    ReplyWithdrawn,
    ReplyText,
    Transcript,
    TurnDone,
    to_dict,
)



def build(cfg: Config, variant: str, console: Console | None = None, engine: Engine | None = None) -> Pipeline:
    """Resolve and load what ``variant`` needs (the engine's models where they live in this
    process, a fallback's too), with a spinner while they load. ``engine``: default the
    in-process LocalEngine."""
    segmenter = listening(cfg, note=None if console is None else lambda text: console.print(f"[dim]{text}[/]"))
    engine = engine or LocalEngine(cfg)
    roles = ROLES_FOR.get(variant, ())
    if console is not None:
        with console.status(f"loading {', '.join(roles)} models…"):
            engine.warm(roles)
    else:
        engine.warm(roles)
    return Pipeline(engine, segmenter, cfg, variant)


def run_file(
    path: Path, cfg: Config, *, variant: str = "chat", save_reply: Path | None = None,
    as_json: bool = False, meters: bool = True, engine: Engine | None = None,
) -> int:
    """Run ``variant`` over the file at ``path``; returns the process exit code."""
    decode(path)  # fail fast, before loading models, on a file that is not audio
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False, soft_wrap=True)
    pipeline = build(cfg, variant, None if as_json else err, engine)
    events: list[Event] = []
    for ev in pipeline.run(file_source(path)):
        if not isinstance(ev, MeterTick):
            events.append(ev)
        if as_json:
            if meters or not isinstance(ev, MeterTick):
                sys.stdout.write(json.dumps(to_dict(ev), ensure_ascii=False) + "\n")
                sys.stdout.flush()
            continue
        _print_line(out, err, ev)
    if pipeline.turns == 0 and not as_json:
        err.print("[yellow]no speech found in the input[/]")
    if save_reply is not None:
        audio = reply_audio(events)
        if audio is None:
            err.print(f"[yellow]no reply audio to save; {escape(str(save_reply))} not written[/]")
        else:
            audio.save_wav(save_reply)
            if not as_json:
                err.print(f"reply audio ({audio.seconds:.1f} s) written to {escape(str(save_reply))}")
    return 1 if pipeline.failures else 0


class paced:  # noqa: N801 - used like the generator function it replaces
    """Deliver a file's chunks in real time, as a microphone would (demos with --output speaker).

    ``close`` may come from another thread (the session ending): it only sets a flag, which
    the iteration checks between chunks.
    """

    def __init__(self, source: Iterable[Audio]) -> None:
        self.source = source
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def __iter__(self) -> Iterator[Audio]:
        start, sent = time.monotonic(), 0.0
        for chunk in self.source:
            if self._closed:
                return
            sent += chunk.seconds
            delay = start + sent - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield chunk


def attach_echo(
    source: Iterable[Audio], player: object | None, cfg: Config, barge_in: str,
) -> tuple[EchoCanceller | None, str | None]:
    """``--barge-in auto`` on a microphone that hears moi's speaker: the echo canceller for the
    capture path (``cfg.echo_canceller``) when ``player`` is moi's own (a
    :class:`local.audio_io.Player`, whose ``far`` end is the reference), and the line to say
    once when there is none: speech over a reply is not heard (``auto`` then acts as ``half``)."""
    if barge_in != "auto" or player is None or not hasattr(source, "captured_at"):
        return None, None
    far = getattr(player, "far", None)
    if far is None:
        return None, "echo cancellation needs the reply on this machine's speaker (moi ui --speaker): barge-in is half"
    echo = canceller(far, cfg.echo_canceller, Path(cfg.echo_record) if cfg.echo_record else None)
    if echo is not None:
        return echo, None
    why = "is off" if cfg.echo_canceller == "off" else f"is not installed (`{INSTALL['pywebrtc']}`)"
    return None, f"echo cancellation {why}: speech over a reply is not heard (barge-in is half)"


def run_live(
    cfg: Config, source: Iterable[Audio], player: Player | None, *, variant: str = "chat",
    barge_in: str = "auto", mode: str = "view", save_reply: Path | None = None, engine: Engine | None = None,
    hears_player: bool = True,
) -> int:
    """Run a live session until the source ends or the user quits; ``mode``: view | quiet | json."""
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False, soft_wrap=True)
    pipeline = build(cfg, variant, err if mode != "json" else None, engine)
    echo, note = attach_echo(source, player, cfg, barge_in)
    if note:
        err.print(f"[dim]{escape(note)}[/]")
    session = LiveSession(pipeline, source, player, barge_in=barge_in, hears_player=hears_player, echo=echo,
                          meters=mode == "view").start()  # only the view draws meters
    keys = KeyReader(session.stop_reply, session.close).start()
    state = ViewState(width=max(20, min(100, out.width - 24)))
    errors = 0

    def drain(timeout: float | None) -> bool:
        nonlocal errors
        try:
            ev = session.events.get(timeout=timeout)
        except queue.Empty:
            return True
        if ev is None:
            return False
        errors += isinstance(ev, ErrorEvent)
        if mode == "json":
            if not isinstance(ev, MeterTick):
                sys.stdout.write(json.dumps(to_dict(ev), ensure_ascii=False) + "\n")
                sys.stdout.flush()
        elif mode == "quiet":
            _print_line(out, err, ev)
        else:
            state.apply(ev)
        return True

    try:
        if mode == "view":
            # drawn here, when something changed and at most 15 times a second: nothing draws
            # while nothing happens (rich's own refresh thread would, 15 times a second)
            with Live(render(state), console=out, auto_refresh=False, transient=False) as live:
                drawn, next_draw = state.version, 0.0
                while drain(None if state.version == drawn else max(0.0, next_draw - time.monotonic())):
                    now = time.monotonic()
                    if state.version != drawn and now >= next_draw:
                        live.update(render(state), refresh=True)
                        drawn, next_draw = state.version, now + 1 / 15
                live.update(render(state), refresh=True)
        else:
            while drain(None):  # blocks until the next event (Ctrl-C still interrupts it)
                pass
        if player is not None:
            player.wait(timeout=60)
    except KeyboardInterrupt:
        pass
    finally:
        keys.close()
        session.close()
        if player is not None:
            player.close()
    if save_reply is not None:
        audio = reply_audio(session.reply_audio)
        if audio is not None:
            audio.save_wav(save_reply)
    return 1 if (pipeline.failures or errors) else 0


def _print_line(out: Console, err: Console, ev: Event) -> None:
    """One line per event people read; their text (speech, replies, errors) is never markup."""
    if isinstance(ev, Transcript):
        out.print(f"[bold cyan]you:[/] {escape(ev.text) or '[dim](nothing intelligible)[/]'}")
    elif isinstance(ev, ReplyText):
        suffix = " [dim](stopped)[/]" if ev.cancelled else ""
        out.print(f"[bold magenta]moi:[/] {escape(ev.text)}{suffix}")
    elif isinstance(ev, TurnDone):
        out.print(f"     [dim]{escape(ev.engine)}: {format_timings(ev.timings)}[/]")
    elif isinstance(ev, FallbackUsed):
        err.print(f"[yellow]{escape(ev.engine)}:[/] {escape(ev.reason)}")
    elif isinstance(ev, ReplyStopped):
        out.print(f"     [dim](stopped by {escape(ev.reason)})[/]")
    elif isinstance(ev, ReplyWithdrawn):
        out.print("     [dim](withdrawn: answered again with what you say next)[/]")
    elif isinstance(ev, Dropped) and ev.reason != "too short":  # a blip is no news
        out.print(f"     [dim](not heard: {escape(ev.reason)})[/]")
    elif isinstance(ev, ReplyPaused) and not ev.paused:
        out.print("     [dim](paused for a sound, went on: nobody spoke)[/]")
    elif isinstance(ev, ErrorEvent):
        err.print(f"[bold red]{'turn ' + str(ev.turn) + ' failed' if ev.turn else 'error'}:[/] {escape(ev.message)}")
