"""What every benchmark shares: the recordings, a timer, and a rich table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

AUDIO_DIR = Path(__file__).resolve().parents[1] / "tests" / "data"  # real recordings, in the repository
SPEECH = AUDIO_DIR / "speech_60s_16k.wav"

console = Console(highlight=False)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (wall clock)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(value: float, target: float, unit: str = "x") -> str:
    """``value`` with a green tick when it meets ``target`` (lower is better), else a red cross."""
    return f"{value:.2f}{unit} " + ("[green]✓[/]" if value <= target else "[red]✗[/]")


def show(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> None:
    table = Table(title=title, caption=caption or None)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)
