"""A laptop's echo, simulated: what its microphone hears of its own speaker."""

from __future__ import annotations

import numpy as np

from shared.audio import SPEECH_RATE as R


def laptop_echo(far: np.ndarray, delay_ms: int = 50, gain_db: float = -9.0, seed: int = 0) -> np.ndarray:
    """``far`` (16 kHz) late by ``delay_ms``, ``gain_db`` quieter, with a 70 ms room tail."""
    rng = np.random.default_rng(seed)
    d = delay_ms * R // 1000
    h = np.zeros(d + int(0.07 * R))
    h[d] = 1.0
    tail = len(h) - d - 1
    h[d + 1 :] = rng.standard_normal(tail) * np.exp(-np.arange(tail) / (0.02 * R)) * 0.15
    return (np.convolve(far, h)[: len(far)] * 10 ** (gain_db / 20)).astype(np.float32)
