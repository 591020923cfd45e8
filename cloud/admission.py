"""Admission control: per model, a bounded number of requests running and waiting.

Requests used to queue without bound and fail with 504 after 120 s. Now each model (stt,
llm, tts) takes ``running`` requests at a time and lets ``waiting`` more wait behind them;
past that, or when the wait it can expect (the measured time a request holds the model, times
the queue ahead of it) would not end before its deadline, the gateway answers at once with
OpenAI's 429 and a ``Retry-After`` of that expected wait. So no request waits past its
deadline: it is served, or told when to come back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud.streams import Deadline
from cloud.wire import ApiError


@dataclass(frozen=True)
class Capacity:
    running: int = 1  # at once (one llama context, one Kokoro session: they run one at a time anyway)
    waiting: int = 4  # queued behind them; one more is told to retry


class Admission:
    """One model's door. ``enter`` returns the release to call when the request is done with it
    (for a stream: when the stream ends, not when its headers go out)."""

    def __init__(self, name: str, capacity: Capacity, first_guess_s: float = 2.0) -> None:
        self.name = name
        self.capacity = capacity
        self._slots = asyncio.Semaphore(capacity.running)
        self._waiting = 0
        self._held_s = first_guess_s  # moving average of how long a request holds the model

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait for a slot."""
        ahead = self._waiting + (1 if self._slots.locked() else 0)
        return self._held_s * ahead / self.capacity.running

    def _busy(self, why: str) -> ApiError:
        retry = max(1, math.ceil(self.expected_wait()))
        return ApiError(
            429,
            f"the {self.name} model is busy ({why}); retry in {retry} s",
            type="rate_limit_error",  # OpenAI's type for a 429
            code="server_busy",
            headers={"Retry-After": str(retry)},
        )

    async def enter(self, deadline: Deadline) -> Callable[[], None]:
        if self._slots.locked():
            if self._waiting >= self.capacity.waiting:
                raise self._busy(f"{self._waiting} request(s) already waiting")
            if self.expected_wait() >= deadline.remaining():
                raise self._busy("the wait would outlast the request's time limit")
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), deadline.remaining())
        except asyncio.TimeoutError:
            raise self._busy("waited until the request's time limit") from None
        finally:
            self._waiting -= 1
        started, released = time.monotonic(), False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._held_s = 0.7 * self._held_s + 0.3 * (time.monotonic() - started)
                self._slots.release()

        return release


__all__ = ["Admission", "Capacity"]
