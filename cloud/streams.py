"""Blocking work under an event loop: one-shot calls in worker threads, streams fed by a thread.

The runners are blocking (CTranslate2, llama.cpp, onnxruntime). :func:`in_thread` runs one call
off the loop; :class:`ThreadStream` runs a producer (a token or sentence generator) in a thread
of its own and hands each item to the loop as it comes, so a response can stream it at once.
Both honour a :class:`Deadline` (→ 504) and a cancel event (→ the producer stops between items).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from cloud.wire import ApiError
from shared.errors import Cancelled

T = TypeVar("T")
Emit = Callable[[Any], None]
END: Any = object()  # what ThreadStream.next() returns after the last item


class Deadline:
    """When a request must be answered by: ``seconds`` from ``start`` (monotonic clock)."""

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds = seconds
        self.at = (time.monotonic() if start is None else start) + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def error(self) -> ApiError:
        return ApiError(504, f"the request took longer than its {self.seconds:g} s limit", code="timeout")


async def in_thread(deadline: Deadline, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread; at the deadline it is abandoned (not killed) → 504."""
    with anyio.move_on_after(deadline.remaining()):
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)
    raise deadline.error()


class ThreadStream:
    """A blocking producer in its own thread; the event loop awaits its items one by one.

    The producer is called with ``emit``. Once ``cancel`` is set, ``emit`` raises
    :class:`Cancelled` so the producer unwinds, closing its generators in its own thread.
    """

    def __init__(
        self, produce: Callable[[Emit], None], cancel: threading.Event, on_done: Callable[[], None] | None = None
    ) -> None:
        """``on_done`` runs on the event loop once the producer has finished, however it ended
        (e.g. releasing the model's admission even if nobody ever read the stream)."""
        self.cancel = cancel
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._on_done = on_done
        threading.Thread(target=self._run, args=(produce,), name="moi-stream", daemon=True).start()

    def _post(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody will read this stream
            self.cancel.set()

    def _emit(self, item: Any) -> None:
        if self.cancel.is_set():
            raise Cancelled("the request was cancelled (client gone, timeout or error)")
        self._post("item", item)

    def _run(self, produce: Callable[[Emit], None]) -> None:
        try:
            produce(self._emit)
        except Cancelled:
            pass  # asked for by the consumer, which no longer reads
        except Exception as exc:  # noqa: BLE001 - raised again on the event loop by next()
            self._post("error", exc)
            return
        finally:
            if self._on_done is not None:
                try:
                    self._loop.call_soon_threadsafe(self._on_done)
                except RuntimeError:  # the event loop is closed: nothing left to release
                    pass
        self._post("end", None)

    async def next(self, deadline: Deadline) -> Any:
        """The next item, or :data:`END`; re-raises the producer's error; 504 at the deadline."""
        try:
            kind, value = await asyncio.wait_for(self._queue.get(), deadline.remaining())
        except asyncio.TimeoutError:
            self.cancel.set()
            raise deadline.error() from None
        if kind == "error":
            self.cancel.set()
            raise value
        return END if kind == "end" else value

    async def first(self, deadline: Deadline) -> Any:
        """Like :meth:`next`, but any failure (or the caller's cancellation) also cancels the stream."""
        try:
            return await self.next(deadline)
        except BaseException:
            self.cancel.set()
            raise


@asynccontextmanager
async def cancel_on_disconnect(request: Any, cancel: threading.Event, every_s: float = 0.25) -> AsyncIterator[None]:
    """While the block runs, a client that goes away sets ``cancel`` (within ``every_s``): for
    routes that answer only at the end (a non-streamed chat), where no write would notice."""

    async def watch() -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(every_s)

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()


def iterate(
    make: Callable[[], Iterator[T]], convert: Callable[[T], Any] | None = None
) -> Callable[[Emit], None]:
    """A producer that builds, drains and closes ``make()`` in the stream's own thread."""

    def produce(emit: Emit) -> None:
        it = make()
        try:
            for item in it:
                emit(item if convert is None else convert(item))
        finally:
            close_iterator(it)

    return produce


def close_iterator(it: Iterator[Any] | None) -> None:
    """Close a generator (runs its ``finally`` now, in this thread); anything else is left alone."""
    close = getattr(it, "close", None)
    if close is not None:
        close()
