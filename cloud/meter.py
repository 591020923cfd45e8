"""Level meter: peak and RMS in dBFS, per chunk and per fixed tick of stream time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOOR_DB = -120.0  # what silence reads as (digital zero has no finite dB)


def to_db(x: float) -> float:
    return max(FLOOR_DB, 20.0 * float(np.log10(x))) if x > 0 else FLOOR_DB


@dataclass(frozen=True)
class Level:
    peak_db: float
    rms_db: float


def measure(samples: np.ndarray) -> Level:
    """Peak and RMS of ``samples`` (float32 in [-1, 1]) in dBFS; silence is FLOOR_DB."""
    if len(samples) == 0:
        return Level(FLOOR_DB, FLOOR_DB)
    peak = float(np.max(np.abs(samples)))
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return Level(to_db(peak), to_db(rms))


class LevelMeter:
    """Cuts a stream into ticks of ``tick_samples`` and reports one Level per full tick.

    Ticks come at a steady rate of stream time whatever the chunk sizes, and in silence too
    (then they read FLOOR_DB), so a view can draw a waveform with a true time scale.
    """

    def __init__(self, tick_samples: int) -> None:
        if tick_samples <= 0:
            raise ValueError("tick_samples must be positive")
        self.tick_samples = tick_samples
        self._pending = np.zeros(0, np.float32)
        self.position = 0  # samples measured so far (end of the last full tick)

    def feed(self, samples: np.ndarray) -> list[tuple[int, Level]]:
        """(end sample of the tick, level) for every tick completed by ``samples``."""
        buf = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n = len(buf) // self.tick_samples
        out = []
        for i in range(n):
            tick = buf[i * self.tick_samples : (i + 1) * self.tick_samples]
            self.position += self.tick_samples
            out.append((self.position, measure(tick)))
        self._pending = np.array(buf[n * self.tick_samples :], dtype=np.float32)
        return out
