"""What every benchmark shares: the recordings, a timer, and a rich table."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
AUDIO_DIR = ROOT / "tests" / "data"  # real recordings, in the repository
SPEECH = AUDIO_DIR / "speech_60s_16k.wav"

console = Console(highlight=False)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (wall clock)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(value: float, target: float, unit: str = "x", digits: int = 2) -> str:
    """``value`` with a green tick when it meets ``target`` (lower is better), else a red cross."""
    return f"{value:.{digits}f}{unit} " + ("[green]✓[/]" if value <= target else "[red]✗[/]")


def show(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> None:
    table = Table(title=title, caption=caption or None)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def end(*procs: subprocess.Popen | None, timeout: float = 10) -> None:
    """Terminate each process (None: skipped) and wait for it; kill one that will not go."""
    for proc in procs:
        if proc is None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


NAME_READS = 20  # a thread's name is read this many times, then kept


def thread_cpu(pid: int, names: dict[str, list] | None = None) -> dict[tuple[str, str], float]:
    """CPU seconds so far of each live thread of process ``pid``, keyed ``(name, tid)`` (the
    OS name: moi names its threads, ``shared.engine.name_os_thread``), from
    ``/proc/PID/task/*/schedstat`` (nanoseconds, not 10 ms ticks). ``names``: tid → [name,
    reads], kept by a caller that reads often: a name is read again for a thread's first
    NAME_READS calls, since a new thread carries its creator's name until it names itself (a
    turn's threads, started by ``moi-answer``, were counted as that thread when the name was
    read once)."""
    names = {} if names is None else names
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process has ended
        return {}
    out: dict[tuple[str, str], float] = {}
    for task in tasks:
        try:
            known = names.setdefault(task.name, ["", 0])
            if known[1] < NAME_READS:
                known[0], known[1] = (task / "comm").read_text().strip(), known[1] + 1
            out[known[0], task.name] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except OSError:  # ended meanwhile
            continue
    return out


def record_bus(path: Path, device: str) -> subprocess.Popen:
    """Record ``device`` (a PulseAudio source) to ``path`` as 16 kHz mono s16le, 10 ms latency."""
    return subprocess.Popen(["parec", f"--device={device}", "--rate=16000", "--channels=1", "--format=s16le",
                             "--raw", "--latency-msec=10", str(path)])


def start_server(*args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """A real `moi serve` (with ``args``, e.g. ``--api-key``) on a free loopback port, in a
    process of its own; returns once its /health answers. ``env``: added to this environment."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "local.cli", "serve", "--port", str(port), *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).is_success:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("moi serve did not start")
