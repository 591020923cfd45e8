"""One voice turn, pipelined: audio in → transcript → reply tokens → spoken pieces, as events.

:func:`run_turn` is the only implementation of a turn. The in-process engine uses it, the
gateway's ``/v1/turn`` streams it (so ``moi serve`` and Modal's gateway run it too), and the
Modal engine runs it over the GPU classes. It yields::

    Transcript · (ReplyToken | ReplyAudio)* · ReplyText · TurnDone

Three threads share the work so nothing waits on anything it need not: the LLM runs in its
own thread and cuts its tokens into pieces (:class:`shared.text.SentenceStream`: the first
clause early, then sentences, the only place a reply is split); a speaking thread synthesizes
each piece as it comes (``engine.speak(piece, split=False)``), while the LLM goes on with the
next; the caller's thread yields events in the order they happen. Setting ``cancel`` (Stop,
barge-in, a client gone) ends generation at the next token and synthesis at the next piece.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cloud.streams import close_iterator
from shared.config import TtsConfig
from shared.engine import Clock, Stopwatch, TurnRequest, name_os_thread
from shared.events import Event, ReplyAudio, ReplyText, ReplyToken, Transcript, TurnDone
from shared.messages import Message
from shared.text import SentenceStream

if TYPE_CHECKING:
    from shared.audio import Audio
    from shared.engine import Engine

_END = object()


def run_turn(
    engine: Engine,
    audio: Audio,
    req: TurnRequest,
    *,
    cancel: threading.Event,
    clock: Clock | None = None,
    tts: TtsConfig = TtsConfig(),
) -> Iterator[Event]:
    """Answer ``audio`` with ``engine``'s transcribe/chat/speak, as events stamped by ``clock``.

    Errors propagate (the caller reports them); closing the generator early cancels the turn.
    ``tts`` says how the reply is cut into pieces (the first one short).
    """
    clock = clock or Stopwatch()
    n, t0 = req.turn, clock()
    timings: dict[str, float] = {}
    text = req.text
    if text is None:
        tr = engine.transcribe(audio, language=req.language)
        timings["stt"] = clock() - t0
        text = tr.text
        yield Transcript(clock(), n, text, tr.language)
    if text and req.variant != "transcribe":
        if req.variant == "echo":
            reply = yield from _speak_text(engine, text, req, cancel, clock, t0, timings)
        else:
            messages = [*req.messages, Message("user", text)]
            reply = yield from _chat_and_speak(engine, messages, req, cancel, clock, t0, timings, tts)
        yield ReplyText(clock(), n, reply, cancelled=cancel.is_set())
    timings["total"] = clock() - t0
    yield TurnDone(clock(), n, engine.name, {k: round(v, 3) for k, v in timings.items()})


def _spoken(timings: dict[str, float], now: float, started: float, t0: float) -> float:
    """Book a piece of audio that took from ``started`` to ``now`` (the turn began at ``t0``)."""
    timings.setdefault("tts_first", now - started)
    timings.setdefault("first_audio", now - t0)
    timings["tts"] = timings.get("tts", 0.0) + now - started
    return now


def _speak_text(
    engine: Engine, text: str, req: TurnRequest, cancel: threading.Event, clock: Clock, t0: float,
    timings: dict[str, float],
) -> Iterator[Event]:
    """Echo: the transcript spoken back, split as any text is."""
    t = clock()
    pieces = engine.speak(text, voice=req.voice, cancel=cancel)
    try:
        for piece in pieces:
            now = _spoken(timings, clock(), t, t0)
            yield ReplyAudio(now, req.turn, piece.text, piece.audio)
            if cancel.is_set():
                break
            t = clock()
    finally:
        close_iterator(pieces)
    return text


def _chat_and_speak(
    engine: Engine,
    messages: list[Message],
    req: TurnRequest,
    cancel: threading.Event,
    clock: Clock,
    t0: float,
    timings: dict[str, float],
    tts: TtsConfig,
) -> Iterator[Event]:
    out: queue.Queue[Any] = queue.Queue()  # events, an exception, or _END from each worker
    pieces: queue.Queue[str | None] = queue.Queue()
    tokens: list[str] = []
    n = req.turn

    def generate() -> None:
        name_os_thread()
        splitter = SentenceStream(tts.first_clause_chars, tts.first_words, tts.max_piece_chars)
        t = clock()
        stream = None
        try:
            stream = engine.chat(messages, options=req.options, cancel=cancel)
            for token in stream:
                timings.setdefault("llm_first_token", clock() - t)
                tokens.append(token)
                out.put(ReplyToken(clock(), n, token))
                for piece in splitter.feed(token):
                    pieces.put(piece)
                if cancel.is_set():
                    break
            if not cancel.is_set():
                for piece in splitter.flush():
                    pieces.put(piece)
            timings["llm"] = clock() - t
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
            out.put(exc)
        finally:
            close_iterator(stream)
            pieces.put(None)
            out.put(_END)

    def speak() -> None:
        name_os_thread()
        try:
            while (piece := pieces.get()) is not None:
                if cancel.is_set():
                    continue  # drain: the LLM thread still puts its end marker
                t = clock()
                spoken = engine.speak(piece, voice=req.voice, split=False, cancel=cancel)
                try:
                    for s in spoken:
                        now = _spoken(timings, clock(), t, t0)
                        out.put(ReplyAudio(now, n, s.text, s.audio))
                        t = clock()
                finally:
                    close_iterator(spoken)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            out.put(exc)
            cancel.set()  # the reply cannot be spoken: stop generating it
            while pieces.get() is not None:
                pass
        finally:
            out.put(_END)

    workers = [
        threading.Thread(target=generate, name="moi-turn-llm", daemon=True),
        threading.Thread(target=speak, name="moi-turn-tts", daemon=True),
    ]
    for w in workers:
        w.start()
    running = len(workers)
    try:
        while running:
            item = out.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        if running:  # closed early or failed: this turn is over, stop both workers
            cancel.set()
        for w in workers:
            w.join()
    return "".join(tokens).strip()


__all__ = ["run_turn"]
