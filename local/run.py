"""Running a pipeline over a file and showing it: `you:` / `moi:` lines, or JSON events."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from local.engine import LocalEngine
from local.pipeline import Pipeline, file_source, reply_audio
from local.vad import Segmenter, SileroVad
from shared.audio import decode
from shared.config import Config
from shared.events import ErrorEvent, Event, MeterTick, ReplyText, Transcript, TurnDone, to_dict
from shared.models import resolve

ROLES_FOR = {"transcribe": ("stt",), "echo": ("stt", "tts"), "chat": ("stt", "llm", "tts")}

TIMING_LABELS = {
    "stt": "stt",
    "llm_first_token": "llm first token",
    "llm": "llm",
    "tts_first": "tts first piece",
    "first_audio": "end of speech → first audio",
    "total": "total",
}


def build(cfg: Config, variant: str, console: Console | None = None) -> Pipeline:
    """Resolve and load what ``variant`` needs, with a spinner while models load."""
    vad = SileroVad(resolve("vad", cfg.vad.model).path)
    engine = LocalEngine(cfg)
    roles = ROLES_FOR.get(variant, ())
    if console is not None:
        with console.status(f"loading {', '.join(roles)} models…"):
            engine.warm(roles)
    else:
        engine.warm(roles)
    return Pipeline(engine, Segmenter(vad, cfg.vad), cfg, variant)


def format_timings(timings: dict[str, float]) -> str:
    return " · ".join(f"{TIMING_LABELS.get(k, k)} {v:.2f}s" for k, v in timings.items())


def run_file(
    path: Path, cfg: Config, *, variant: str = "chat", save_reply: Path | None = None,
    as_json: bool = False, meters: bool = True,
) -> int:
    """Run ``variant`` over the file at ``path``; returns the process exit code."""
    decode(path)  # fail fast, before loading models, on a file that is not audio
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False, soft_wrap=True)
    pipeline = build(cfg, variant, None if as_json else err)
    events: list[Event] = []
    for ev in pipeline.run(file_source(path)):
        if not isinstance(ev, MeterTick):
            events.append(ev)
        if as_json:
            if meters or not isinstance(ev, MeterTick):
                sys.stdout.write(json.dumps(to_dict(ev)) + "\n")
                sys.stdout.flush()
            continue
        if isinstance(ev, Transcript):
            out.print(f"[bold cyan]you:[/] {ev.text or '[dim](nothing intelligible)[/]'}")
        elif isinstance(ev, ReplyText):
            suffix = " [dim](stopped)[/]" if ev.cancelled else ""
            out.print(f"[bold magenta]moi:[/] {ev.text}{suffix}")
        elif isinstance(ev, TurnDone):
            out.print(f"     [dim]{ev.engine}: {format_timings(ev.timings)}[/]")
        elif isinstance(ev, ErrorEvent):
            err.print(f"[bold red]turn {ev.turn} failed:[/] {ev.message}")
    if pipeline.turns == 0 and not as_json:
        err.print("[yellow]no speech found in the input[/]")
    if save_reply is not None:
        audio = reply_audio(events)
        if audio is None:
            err.print(f"[yellow]no reply audio to save; {save_reply} not written[/]")
        else:
            audio.save_wav(save_reply)
            if not as_json:
                err.print(f"reply audio ({audio.seconds:.1f} s) written to {save_reply}")
    return 1 if pipeline.failures else 0
