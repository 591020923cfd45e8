"""`moi transcribe PATH...`: recordings → timestamped transcripts, with a progress bar.

    moi transcribe PATH... [--local|--remote] [--format txt,srt,vtt,json] [--output-dir DIR]
                   [--jobs N] [--recursive] [--language L] [--force]

:func:`register` adds the command to moi's typer app; ``python -m local.batch_cli transcribe
...`` runs it on its own. Exit codes: 0 all done, 1 some file failed, 2 bad usage (no such
path, unknown format, no Modal token for ``--remote``, no model installed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from local.batch import (
    BatchOptions,
    FileOptions,
    FileOutcome,
    Mapper,
    Plan,
    Report,
    local_mapper,
    modal_mapper,
    plan_batch,
    run_batch,
    worker_spec,
)
from local.transcripts import parse_formats
from shared.config import MODAL_APP, Config, cpu_cores
from shared.errors import MoiError

err = Console(stderr=True, highlight=False)

MODAL_CLASS = "Transcriber"


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]moi: error:[/] {escape(message)}", soft_wrap=True)  # library text is not markup
    return typer.Exit(code)


def transcribe(
    paths: list[Path] = typer.Argument(..., help="Audio files and/or folders of them."),
    local: bool = typer.Option(True, "--local/--remote", help="Transcribe here, or on Modal's GPUs (deployed app)."),
    formats: str = typer.Option("txt,srt,vtt,json", "--format", "-f", help="Comma list of txt, srt, vtt, json (or all)."),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir", "-o", help="Write here, mirroring each PATH's tree (default: next to each input)."
    ),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Worker processes (default: one per core, at most one per file)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Include sub-folders of folder PATHs."),
    language: Optional[str] = typer.Option(None, "--language", "-l", help="Spoken language (Whisper code)."),
    force: bool = typer.Option(False, "--force", help="Redo files whose transcripts are already up to date."),
    model: Optional[str] = typer.Option(None, "--model", help="Whisper model spec (see `moi models`)."),
) -> None:
    """Transcribe recordings to txt/srt/vtt/json with timestamps; stop and rerun at will."""
    try:
        fmts = parse_formats(formats)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    remote, remote_errors = (None, ()) if local else _modal()  # one line when Modal is not set up
    try:
        cfg = Config.load(stt__language=language, stt__model=model)
        # Word times place the subtitle cues and fill the json; plain text needs none of them.
        file_opts = FileOptions(language=cfg.stt.language, word_timestamps=fmts != ("txt",))
        opts = BatchOptions(fmts, output_dir, recursive, force, file_opts)
        plan = plan_batch(paths, opts)
    except MoiError as exc:
        raise _fail(str(exc)) from None
    if not plan.todo and not plan.skipped:
        err.print("[yellow]no audio files found[/] (folders are scanned by file extension; --recursive for sub-folders)")
        raise typer.Exit(0)
    # By default a worker per core, but never more than there are files: one long file gets one
    # worker with every core's threads instead of a worker that idles.
    n_jobs = jobs or max(1, min(cpu_cores(), len(plan.todo)))
    _say_plan(plan, n_jobs, local)
    try:
        mapper = remote or local_mapper(worker_spec(cfg, n_jobs), n_jobs)
    except MoiError as exc:
        raise _fail(str(exc)) from None
    try:
        report = _run_with_progress(plan, mapper)
    except remote_errors as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(f"Modal: {first} (finished files are kept; run again to go on)", 1) from None
    show_report(report)
    raise typer.Exit(report.exit_code)


def _modal() -> tuple[Mapper, tuple[type[BaseException], ...]]:
    """The deployed Transcriber's ``transcribe_file`` as a mapper, and the errors Modal raises;
    one clear line when Modal is not set up."""
    from local.deployed import transcriber

    try:
        found, errors = transcriber("--remote")
    except MoiError as exc:
        raise _fail(str(exc)) from None
    return modal_mapper(found.transcribe_file), errors


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 7200 else f"{seconds / 60:.1f} min"


def _say_plan(plan: Plan, jobs: int, local: bool) -> None:
    where = f"{jobs} worker{'s' * (jobs > 1)}" if local else f"Modal ({MODAL_APP}.{MODAL_CLASS})"
    line = f"{len(plan.todo)} file(s), {_minutes(plan.todo_seconds)} of audio, to transcribe on {where}"
    if plan.skipped:
        line += f"; {len(plan.skipped)} already done (--force redoes them)"
    err.print(line)


def _run_with_progress(plan: Plan, mapper: Mapper) -> Report:
    total_s = plan.todo_seconds
    state = {"files": 0, "audio": 0.0, "failed": 0}

    def fields() -> dict[str, str]:
        failed = f"[red]{state['failed']} failed[/]" if state["failed"] else ""
        return {
            "files": f"{state['files']}/{len(plan.todo)} files",
            "audio": f"{_minutes(state['audio'])} / {_minutes(total_s)}",
            "failed": failed,
        }

    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[files]}"),
        TextColumn("{task.fields[audio]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[failed]}"),
        console=err,
    )
    with progress:
        task = progress.add_task("transcribing", total=max(total_s, 1e-6), **fields())

        def on_file(outcome: FileOutcome) -> None:
            state["files"] += 1
            state["audio"] += outcome.seconds_estimate
            state["failed"] += outcome.status == "failed"
            if outcome.status == "failed" and progress.console.is_terminal:  # else the summary says it
                progress.console.print(f"[red]failed:[/] {outcome.key}: {outcome.reason}", soft_wrap=True)
            progress.update(task, completed=state["audio"], **fields())

        report = run_batch(plan, mapper, on_file)
        progress.update(task, completed=max(total_s, 1e-6))
    return report


def show_report(report: Report) -> None:
    """The summary table, each failure with its reason, and where the manifest is."""
    table = Table(title="moi transcribe", title_justify="left")
    for i, name in enumerate(("status", "files", "audio", "processing", "speed")):
        table.add_column(name, justify="left" if i == 0 else "right")
    for status, style in (("done", "green"), ("skipped", "dim"), ("failed", "red")):
        rows = report.having(status)
        audio = sum(o.duration_s for o in rows)
        took = sum(o.processing_s for o in rows)
        speed = f"{audio / took:.1f}x real time" if took and audio else ""
        table.add_row(f"[{style}]{status}[/]", str(len(rows)), _minutes(audio), f"{took:.1f} s" if took else "", speed)
    done_audio = sum(o.duration_s for o in report.having("done"))
    table.caption = f"wall {report.wall_s:.1f} s" + (
        f" · {done_audio / report.wall_s:.1f} s of audio per second" if done_audio and report.wall_s else ""
    )
    err.print(table)
    for o in report.having("failed"):
        err.print(f"[red]failed:[/] {o.key}: {o.reason}", soft_wrap=True)
    err.print(f"manifest: {report.manifest}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `transcribe` to moi's typer app (local/cli.py)."""
    app.command("transcribe")(transcribe)


def main() -> None:
    """`python -m local.batch_cli transcribe ...`, before (or without) local/cli.py."""
    app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})

    @app.callback()
    def _group() -> None:
        """moi's batch transcription on its own."""

    register(app)
    app()


if __name__ == "__main__":
    main()
