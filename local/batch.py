"""Batch transcription: files and folders of recordings → timestamped transcripts, resumable.

Three layers, each usable on its own:

- :func:`transcribe_one` — the work for one file, a pure function of (name, bytes or path,
  options, models) that returns a JSON-ready dict (or ``{"name", "error": {...}}`` for a bad
  file). The VAD cuts the file into windows of at most ``max_window_s`` (Whisper sees 30 s at a
  time), the windows go through Whisper in batches with word timestamps, and every time is on
  the file's clock. Modal's GPU class calls exactly this.
- mappers — anything shaped like Modal's ``.starmap(inputs, order_outputs=False,
  return_exceptions=True)``: results arrive in any order, exceptions come back as values.
  :func:`local_mapper` runs a pool of worker processes that each load the models once;
  :func:`modal_mapper` sends each file's bytes to a deployed ``Transcriber``.
- :func:`plan_batch` + :func:`run_batch` — find the inputs, skip those whose outputs are all
  newer than the input, feed the rest through a mapper and write each result (atomically) as it
  arrives, keeping ``moi-manifest.json`` up to date. A run killed at any point and started again
  redoes only the files whose outputs were not all written.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
import wave
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cloud.stt import SpeechToText
from cloud.longform import BatchModels, FileOptions, Result, error_result, transcribe_one
from local.transcripts import FORMATS, MANIFEST_NAME, RENDER, TEMP_SUFFIX, Manifest, clean_stale_temps, write_atomic
from cloud.vad import SileroVad
from shared.config import Config, SttConfig, VadConfig, cpu_cores
from shared.errors import AudioError, ConfigError, EngineError
from shared.models import ResolvedModel, resolve

#: Suffixes picked up when scanning a folder (a file named on the command line is always taken).
AUDIO_SUFFIXES = frozenset({
    ".wav", ".wave", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff", ".aifc",
    ".webm", ".mp4", ".mka", ".amr", ".caf",
})

#: Largest file sent to Modal as bytes. Modal's client moves any argument over 2 MiB through its
#: blob store by itself (modal/_utils/blob_utils.py), so an hour of 16 kHz WAV (115 MB) or MP3
#: (~30-60 MB) goes through ``.map`` as is; but the whole file sits in memory on both ends, so
#: bigger files are refused with a message. Past that, files belong in a ``modal.Volume``
#: (``modal volume put``), with the method taking a path instead of bytes.
REMOTE_MAX_BYTES = 256 * 1024 * 1024

Inputs = Iterable[tuple[str, str, FileOptions]]  # (name, path, options)
Mapper = Callable[[Inputs], Iterable["Result | BaseException"]]


# --- mappers: where the per-file work runs ------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to load its models (picklable)."""

    stt: ResolvedModel
    stt_cfg: SttConfig
    vad: ResolvedModel
    vad_cfg: VadConfig


def worker_spec(cfg: Config, jobs: int) -> WorkerSpec:
    """Resolve the models here (a missing one fails before any process starts) and give each of
    ``jobs`` workers ``cores // jobs`` CTranslate2 threads unless ``cfg`` sets a number."""
    threads = cfg.stt.cpu_threads or max(1, cpu_cores() // jobs)
    return WorkerSpec(
        resolve("stt", cfg.stt.model), replace(cfg.stt, cpu_threads=threads), resolve("vad", cfg.vad.model), cfg.vad
    )


def load_models(spec: WorkerSpec) -> BatchModels:
    return BatchModels(SpeechToText(spec.stt, spec.stt_cfg), SileroVad(spec.vad.path), spec.vad_cfg)


_worker_models: BatchModels | None = None  # one per worker process, set by _init_worker


def _init_worker(spec: WorkerSpec) -> None:
    global _worker_models
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _worker_models = load_models(spec)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (kill -9) stops within a second instead of lingering."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _work(name: str, path: str, options: FileOptions) -> Result:
    assert _worker_models is not None, "worker not initialized"
    return transcribe_one(name, path, options, _worker_models)


def local_mapper(spec: WorkerSpec, jobs: int) -> Mapper:
    """``jobs`` spawned worker processes, each loading the models once; results as they finish."""

    def run(inputs: Inputs) -> Iterator[Result]:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads/models
        pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(spec,))
        try:
            futures = {pool.submit(_work, name, path, opts): name for name, path, opts in inputs}
            for future in as_completed(futures):
                name = futures[future]
                try:
                    yield future.result()
                except BrokenProcessPool as exc:
                    yield error_result(name, EngineError(f"a worker process died ({exc or 'killed'})"))
                except Exception as exc:  # noqa: BLE001 - one file's crash fails that file; the rest go on
                    yield error_result(name, exc)
        except BaseException:  # Ctrl-C, or the caller stopped early: files in flight are dropped, not awaited
            _terminate(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return run


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (Python 3.14 has ``terminate_workers``; before it, the process table)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()


def modal_mapper(method: Any, max_bytes: int = REMOTE_MAX_BYTES) -> Mapper:
    """Fan out over ``method`` (e.g. ``modal.Cls.from_name("moi", "Transcriber")().transcribe_file``),
    which is called as ``method(name, data: bytes, options: dict)`` through
    ``method.starmap(..., order_outputs=False, return_exceptions=True)``.

    Files are read lazily, as the map pulls its inputs, and sent as bytes: see
    :data:`REMOTE_MAX_BYTES` for why bytes and where the limit is. Files refused here come back
    as failed results after the remote ones.
    """

    def run(inputs: Inputs) -> Iterator[Result | BaseException]:
        refused: list[Result] = []

        def payloads() -> Iterator[tuple[str, bytes, dict[str, Any]]]:
            for name, path, opts in inputs:
                try:
                    size = os.path.getsize(path)
                    if size > max_bytes:
                        raise AudioError(
                            f"{name}: {size / 1e6:.0f} MB is more than the {max_bytes / 1e6:.0f} MB sent to Modal "
                            "per file; cut it, or transcribe it --local"
                        )
                    data = Path(path).read_bytes()
                except OSError as exc:
                    refused.append(error_result(name, AudioError(f"{name}: cannot read ({exc.strerror or exc})")))
                    continue
                except AudioError as exc:
                    refused.append(error_result(name, exc))
                    continue
                yield name, data, dataclasses.asdict(opts)

        yield from method.starmap(payloads(), order_outputs=False, return_exceptions=True)
        yield from refused

    return run


# --- the batch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchOptions:
    formats: tuple[str, ...] = FORMATS
    output_dir: Path | None = None  # None: next to each input
    recursive: bool = False
    force: bool = False
    file: FileOptions = field(default_factory=FileOptions)


@dataclass(frozen=True)
class Job:
    key: str  # manifest key and the name in messages: the input's path relative to its root
    source: Path
    out_base: Path  # outputs are out_base + ".txt", ".srt"...
    seconds: float  # duration read from the file's header (0 when unreadable or not read)

    def outputs(self, formats: Sequence[str]) -> dict[str, Path]:
        return {f: self.out_base.with_name(f"{self.out_base.name}.{f}") for f in formats}

    def is_fresh(self, formats: Sequence[str]) -> bool:
        """All outputs exist and none is older than the input."""
        try:
            src = self.source.stat().st_mtime
            return all(p.stat().st_mtime >= src for p in self.outputs(formats).values())
        except OSError:
            return False


@dataclass(frozen=True)
class Plan:
    todo: list[Job]  # longest first, so no long file starts last
    skipped: list[Job]
    manifest: Path
    options: BatchOptions

    @property
    def todo_seconds(self) -> float:
        return sum(j.seconds for j in self.todo)


def probe_seconds(path: Path) -> float:
    """Duration from the file's header, without decoding; 0.0 when it cannot be read."""
    import av

    if path.suffix.lower() in (".wav", ".wave"):  # FFmpeg takes ~10 ms to probe a WAV; this, microseconds
        try:
            with wave.open(str(path), "rb") as w:
                return w.getnframes() / w.getframerate()
        except (wave.Error, EOFError, OSError, ZeroDivisionError):
            pass  # float or extensible WAV, or not a WAV at all: ask FFmpeg
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            if c.duration:
                return c.duration / 1_000_000
            s = c.streams.audio[0] if c.streams.audio else None
            return float(s.duration * s.time_base) if s is not None and s.duration else 0.0
    except (av.error.FFmpegError, OSError, UnicodeDecodeError):
        return 0.0  # the real decode says why, per file


def _inputs(paths: Sequence[Path], recursive: bool) -> list[tuple[Path, Path]]:
    """(root, file) pairs; a folder root contributes its audio files, a file is its own."""
    found: dict[Path, tuple[Path, Path]] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"{p}: no such file or folder")
        p = p.resolve()
        if p.is_file():
            found.setdefault(p, (p.parent, p))
            continue
        for f in sorted(p.rglob("*") if recursive else p.iterdir()):
            rel = f.relative_to(p)
            if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES and not any(x.startswith(".") for x in rel.parts):
                found.setdefault(f, (p, f))
    return list(found.values())


def plan_batch(paths: Sequence[Path], options: BatchOptions) -> Plan:
    """Inputs, where their outputs go, and which are already done. Raises ConfigError on bad usage.

    Outputs go next to each input, or under ``output_dir`` at the input's path relative to
    the PATH it was found under. The manifest goes to ``output_dir``, else to the one PATH
    folder (a file's folder), else to the folder the PATHs share.
    """
    pairs = _inputs(paths, options.recursive)
    out_dir = options.output_dir.resolve() if options.output_dir is not None else None
    roots = {root for root, _ in pairs} or {Path(p).resolve() for p in paths}
    manifest_dir = out_dir or Path(os.path.commonpath([str(r if r.is_dir() else r.parent) for r in roots]))
    bases: dict[Path, list[tuple[Path, Path]]] = {}
    for root, f in pairs:
        rel = f.relative_to(root)
        bases.setdefault((out_dir or root) / rel.with_suffix(""), []).append((f, rel))
    jobs: list[Job] = []
    for base, members in bases.items():
        for f, rel in members:
            # a.wav and a.mp3 side by side, or an input named like an output: keep the suffix
            clash = len(members) > 1 or f.suffix.lower().lstrip(".") in FORMATS
            key = rel if out_dir is not None else f.relative_to(manifest_dir)
            jobs.append(Job(key.as_posix(), f, base.with_name(f.name) if clash else base, 0.0))
    keys: dict[str, Job] = {}
    for j in jobs:
        if (other := keys.setdefault(j.key, j)) is not j:
            raise ConfigError(
                f"{other.source} and {j.source} would write the same transcripts ({j.key}): "
                "transcribe them into separate --output-dir folders"
            )
    todo: list[Job] = []
    skipped: list[Job] = []
    for j in jobs:
        if options.force or not j.is_fresh(options.formats):
            todo.append(replace(j, seconds=probe_seconds(j.source)))  # for the progress bar and the order
        else:
            skipped.append(j)
    todo.sort(key=lambda j: (-j.seconds, j.key))
    _check_writable({manifest_dir, *(j.out_base.parent for j in todo)})
    return Plan(todo, sorted(skipped, key=lambda j: j.key), manifest_dir / MANIFEST_NAME, options)


def _check_writable(folders: set[Path]) -> None:
    """Every output folder exists (made now) and takes a file, before any work starts: one
    clear ConfigError, not a traceback after the first transcription."""
    for folder in sorted(folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".moi-write-check.{os.getpid()}{TEMP_SUFFIX}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write transcripts to {folder}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class FileOutcome:
    key: str
    status: str  # done | skipped | failed
    reason: str | None
    duration_s: float
    processing_s: float
    seconds_estimate: float = 0.0  # the header's duration, what the progress bar counted

    @property
    def rtf(self) -> float | None:
        """Seconds of processing per second of audio."""
        return round(self.processing_s / self.duration_s, 4) if self.duration_s and self.processing_s else None


@dataclass
class Report:
    outcomes: list[FileOutcome]
    wall_s: float
    manifest: Path

    def having(self, status: str) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def exit_code(self) -> int:
        return 1 if self.having("failed") else 0


def run_batch(plan: Plan, mapper: Mapper, on_file: Callable[[FileOutcome], None] | None = None) -> Report:
    """Transcribe ``plan.todo`` through ``mapper``, writing each result as it arrives."""
    t0 = time.perf_counter()
    opts = plan.options
    manifest = Manifest(plan.manifest, {"formats": list(opts.formats)})
    clean_stale_temps([plan.manifest.parent, *(j.out_base.parent for j in plan.todo)])
    outcomes: list[FileOutcome] = []
    for job in plan.skipped:
        prev = manifest.previous(job.key)
        seconds = prev.get("duration_s") or round(probe_seconds(job.source), 3)  # probed only without a record
        oc = FileOutcome(job.key, "skipped", None, seconds, 0.0)
        # outputs exist, so it was transcribed at least once even if that run died before noting it
        _record(manifest, job, oc, opts.formats, max(1, prev.get("transcriptions", 0)))
        outcomes.append(oc)
    manifest.save()

    pending = {j.key: j for j in plan.todo}
    stray: list[BaseException] = []

    def finish(job: Job, oc: FileOutcome) -> None:
        runs = manifest.previous(job.key).get("transcriptions", 0) + (oc.status == "done")
        _record(manifest, job, oc, opts.formats, runs)
        outcomes.append(oc)
        if on_file is not None:
            on_file(oc)

    try:
        for result in mapper((j.key, str(j.source), opts.file) for j in plan.todo):
            if isinstance(result, BaseException):  # Modal's return_exceptions: no name attached
                stray.append(result)
                continue
            job = pending.pop(result.get("name", ""), None)
            if job is None:
                stray.append(EngineError(f"a result came back for an input not asked for: {result.get('name')!r}"))
                continue
            finish(job, _write(job, result, opts.formats))
        lost = "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in stray)) or "no result came back"
        for job in list(pending.values()):
            del pending[job.key]
            finish(job, FileOutcome(job.key, "failed", lost[:300], 0.0, 0.0, job.seconds))
    finally:
        manifest.save()
    return Report(outcomes, time.perf_counter() - t0, plan.manifest)


def _write(job: Job, result: Result, formats: Sequence[str]) -> FileOutcome:
    took = float(result.get("processing_s") or 0.0)
    if "error" in result:
        message = result["error"]["message"]
        reason = message.removeprefix(f"{job.key}: ")
        return FileOutcome(job.key, "failed", reason, 0.0, took, job.seconds)
    if "segments" not in result:
        reason = "the remote Transcriber answered in another format: redeploy modal_app.py"
        return FileOutcome(job.key, "failed", reason, 0.0, took, job.seconds)
    doc = {**result, "source": job.key}
    try:
        for fmt, path in job.outputs(formats).items():
            write_atomic(path, RENDER[fmt](doc))
    except OSError as exc:
        return FileOutcome(job.key, "failed", f"cannot write {exc.filename}: {exc.strerror}", 0.0, took, job.seconds)
    return FileOutcome(job.key, "done", None, float(result["duration"]), took, job.seconds)


def _record(manifest: Manifest, job: Job, oc: FileOutcome, formats: Sequence[str], transcriptions: int) -> None:
    outputs = [os.path.relpath(p, manifest.path.parent) for p in job.outputs(formats).values()]
    manifest.record(job.key, {
        "status": oc.status, "reason": oc.reason, "duration_s": oc.duration_s,
        "processing_s": oc.processing_s, "rtf": oc.rtf, "outputs": outputs if oc.status != "failed" else [],
        "transcriptions": transcriptions,
    })
