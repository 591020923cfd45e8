"""--remote: HttpEngine against the real gateway on loopback, and failover under faults."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from cloud.engine import LocalEngine
from cloud.http import create_app
from cloud.vad import Segmenter, SileroVad
from local import SAMPLE
from cloud.pipeline import Pipeline, file_source
from local.remote import Breaker, FallbackEngine, HttpEngine, RemoteConfig
from shared.audio import Audio
from shared.config import Config
from shared.engine import TurnRequest
from shared.errors import EngineError
from shared.events import ErrorEvent, FallbackUsed, ReplyAudio, ReplyText, ReplyToken, SpeechEnded, Transcript, TurnDone
from shared.messages import ChatOptions, Thread
from shared.models import resolve
from tests.conftest import ROOT, serve, words

CFG = Config.load(env={}, llm__max_tokens=20, llm__reuse_prefix=False)
KEY = "remote-key"


@pytest.fixture(scope="module")
def local(runners):
    return LocalEngine(CFG, runners)


class Faults:
    """Not a model: an ASGI wrapper in front of the real gateway that fails on demand and counts
    requests. ``cut``: the response is cut right after its first body chunk (for /v1/turn, the
    transcript frame), as a server that dies mid-turn would leave it."""

    def __init__(self, app):
        self.app = app
        self.mode = "ok"  # ok | 500 | slow | cut
        self.requests: list[str] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        self.requests.append(scope["path"])
        if self.mode == "500":
            await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "injected", "type": "server_error"}}'})
            return
        if self.mode == "slow":
            await asyncio.sleep(3.0)
        if self.mode == "cut":
            sent = []

            async def cutting(message):
                if sent and message["type"] == "http.response.body":
                    raise ConnectionAbortedError("injected: the server died mid-turn")
                await send(message)
                if message["type"] == "http.response.body" and message.get("body"):
                    sent.append(1)

            await self.app(scope, receive, cutting)
            return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def faults(local):
    return Faults(create_app(local, api_key=KEY))


@pytest.fixture(scope="module")
def url(faults):
    with serve(faults) as u:
        yield u


@pytest.fixture()
def remote(url, faults):
    faults.mode = "ok"
    engine = HttpEngine(RemoteConfig(url, KEY, first_byte_s=60))
    yield engine
    engine.close()


def _vad():
    return SileroVad(resolve("vad").path)


def run(engine, cfg=CFG):
    pipe = Pipeline(engine, Segmenter(_vad(), cfg.vad), cfg, "chat")
    return pipe, [e for e in pipe.run(file_source(SAMPLE)) if not hasattr(e, "rms_db")]


def test_single_calls_give_the_same_as_local(remote, local, speech60):
    clip = speech60.slice(0, 7)
    assert remote.transcribe(clip).text == local.transcribe(clip).text
    thread = Thread(CFG.llm.system_prompt)
    thread.add_user("How do I get to Dublin?")
    opts = ChatOptions(max_tokens=20)
    assert "".join(remote.chat(thread.messages(), options=opts)) == "".join(local.chat(thread.messages(), options=opts))
    r = list(remote.speak("Hello there."))
    l = list(local.speak("Hello there."))
    # the same voice, not the same samples: Piper draws its phoneme lengths at random (±5 %)
    seconds = [sum(s.audio.seconds for s in x) for x in (r, l)]
    assert abs(seconds[0] - seconds[1]) < 0.15 * seconds[1], seconds
    assert r[0].audio.sample_rate == 24_000
    assert remote.voices() == local.voices() and remote.voices()


def test_a_remote_turn_is_one_request(remote, faults, speech60):
    before = len(faults.requests)
    request = TurnRequest(messages=(), options=ChatOptions(max_tokens=20), turn=1)
    events = list(remote.turn(speech60.slice(0, 2.3), request, cancel=threading.Event()))
    assert faults.requests[before:] == ["/v1/turn"]  # transcript, reply and its audio: one round trip
    kinds = [type(e) for e in events]
    assert kinds[0] is Transcript and kinds[-2:] == [ReplyText, TurnDone]
    assert ReplyToken in kinds and ReplyAudio in kinds
    assert events[-1].engine == "remote" and events[-1].timings["first_audio"] <= events[-1].timings["total"]


def test_remote_errors_are_engine_errors(url):
    bad = HttpEngine(RemoteConfig(url, "wrong-key"))
    with pytest.raises(EngineError, match="HTTP 401"):
        bad.transcribe(Audio.silence(1.0))
    with pytest.raises(EngineError, match="HTTP 401"):
        list(bad.turn(Audio.silence(1.0), TurnRequest(), cancel=threading.Event()))
    gone = HttpEngine(RemoteConfig("http://127.0.0.1:9", KEY, connect_timeout_s=0.5))
    with pytest.raises(EngineError, match="ConnectError"):
        list(gone.chat([], options=ChatOptions()))


def answered_once(events):
    """Every transcript with words got exactly one reply and one TurnDone, none twice."""
    turns = {e.turn for e in events if isinstance(e, Transcript) and e.text}
    replies = [e.turn for e in events if isinstance(e, ReplyText)]
    done = [e.turn for e in events if isinstance(e, TurnDone)]
    return turns and sorted(replies) == sorted(turns) and sorted(done) == sorted(set(done)) and set(done) >= turns


def test_500s_are_answered_locally_once_and_the_breaker_comes_back(remote, local, faults):
    now = [0.0]
    breaker = Breaker(cooldown_s=30, clock=lambda: now[0])
    engine = FallbackEngine(remote, local, breaker)
    faults.mode = "500"
    _pipe, events = run(engine)
    assert answered_once(events)
    fell = [e for e in events if isinstance(e, FallbackUsed)]
    assert fell and fell[0].engine == "remote → local" and "HTTP 500" in fell[0].reason
    engines = [e.engine for e in events if isinstance(e, TurnDone)]
    assert engines[0] == "remote → local" and all(e == "local (remote down)" for e in engines[1:])
    assert breaker.state == "open"
    faults.mode = "ok"
    now[0] += 31  # cool-down over: the next turn probes the remote, which answers again
    before = len(faults.requests)
    _, again = run(engine)
    assert answered_once(again)
    done = [e.engine for e in again if isinstance(e, TurnDone)]
    assert done == ["remote"] * len(done)
    assert len(faults.requests) > before and breaker.state == "closed"


def test_the_label_names_who_answered_after_the_cooldown(remote, local, faults):
    """Cool-down over but the remote still down: the probe fails and the turn, answered
    locally, says so (it used to say "remote", the breaker's state at the end of the turn)."""
    now = [0.0]
    engine = FallbackEngine(remote, local, Breaker(cooldown_s=30, clock=lambda: now[0]))
    faults.mode = "500"
    run(engine)
    now[0] += 31
    _, events = run(engine)
    done = [e.engine for e in events if isinstance(e, TurnDone)]
    assert done[0] == "remote → local" and all(d == "local (remote down)" for d in done[1:])


def test_a_remote_slower_than_the_deadline_falls_back(url, local, faults):
    faults.mode = "slow"  # 3 s before any answer, as a cold start would be
    engine = FallbackEngine(HttpEngine(RemoteConfig(url, KEY, first_byte_s=1.0)), local)
    started = time.monotonic()
    _, events = run(engine)
    assert answered_once(events)
    fell = [e for e in events if isinstance(e, FallbackUsed)]
    assert fell and "Timeout" in fell[0].reason
    assert time.monotonic() - started < 60


def test_cut_after_the_transcript_is_answered_locally_from_it(remote, local, faults):
    """The server dies after the transcript frame: the local models answer the same utterance,
    from the transcript already heard (no second transcript), and say which path answered."""
    faults.mode = "cut"
    engine = FallbackEngine(remote, local, Breaker(cooldown_s=0))
    _, events = run(engine)
    first = [e for e in events if getattr(e, "turn", None) == 1]
    kinds = [type(e) for e in first]
    assert kinds.count(Transcript) == 1 and kinds.index(Transcript) < kinds.index(FallbackUsed)
    assert kinds[-2:] == [ReplyText, TurnDone] and first[-1].engine == "remote → local"
    assert "dublin" in words(next(e.text for e in first if isinstance(e, Transcript)))
    assert answered_once(events)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served():
    """`moi serve` in its own process, so a test can kill it with SIGKILL."""
    port = _free_port()
    env = {**os.environ, "MOI_LLM_MAX_TOKENS": "20"}
    proc = subprocess.Popen([sys.executable, "-m", "local.cli", "serve", "--port", str(port), "--api-key", KEY],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    probe = HttpEngine(RemoteConfig(url, KEY))
    deadline = time.monotonic() + 240  # three models load before it listens; slow on a busy machine
    while time.monotonic() < deadline and proc.poll() is None and not probe.health():
        time.sleep(0.25)
    assert probe.health(), proc.stderr.read().decode() if proc.poll() is not None else "moi serve did not start"
    yield proc, url
    proc.kill()
    proc.wait()


def test_server_killed_before_the_turn(served, local):
    proc, url = served
    engine = FallbackEngine(HttpEngine(RemoteConfig(url, KEY, first_byte_s=5)), local)
    pipe = Pipeline(engine, Segmenter(_vad(), CFG.vad), CFG, "chat")
    events = []
    for ev in pipe.run(file_source(SAMPLE)):
        events.append(ev)
        if isinstance(ev, SpeechEnded) and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # the gateway dies as the utterance ends
            proc.wait()
    first = [e for e in events if getattr(e, "turn", None) == 1]
    assert [type(e) for e in first if isinstance(e, (Transcript, ReplyText, TurnDone))] == [Transcript, ReplyText, TurnDone]
    assert [e.engine for e in first if isinstance(e, TurnDone)] == ["remote → local"]
    assert "dublin" in words(next(e.text for e in first if isinstance(e, Transcript)))
    assert answered_once(events)


def test_server_killed_mid_reply_ends_the_turn_without_repeating(served, local):
    proc, url = served
    engine = FallbackEngine(HttpEngine(RemoteConfig(url, KEY, first_byte_s=5)), local, Breaker(cooldown_s=3600))
    long = Config.load(env={}, llm__max_tokens=300)  # still generating when the server dies
    pipe = Pipeline(engine, Segmenter(_vad(), long.vad), long, "chat")
    events = []
    for ev in pipe.run(file_source(SAMPLE)):
        events.append(ev)
        if isinstance(ev, ReplyToken) and ev.turn == 1 and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert proc.returncode == -signal.SIGKILL
    assert errors and errors[0].turn == 1 and "mid-way" in errors[0].message, [
        e for e in events if isinstance(e, (FallbackUsed, TurnDone, ReplyText, ErrorEvent))]
    assert not any(isinstance(e, ReplyText) and e.turn == 1 for e in events)  # no second, local reply
    later = [e for e in events if isinstance(e, TurnDone)]
    assert later and all(e.engine == "local (remote down)" for e in later)  # the next turns go on locally


def test_stop_reaches_the_server_within_a_token(runners, speech60):
    """Stop on the client closes the turn stream; the gateway's generation for that turn ends
    at its next token (counted on the server side, in the real runners)."""

    class Counting(LocalEngine):
        def __init__(self):
            super().__init__(Config.load(env={}, llm__max_tokens=300), runners)
            self.generated, self.closed = 0, threading.Event()

        def chat(self, messages, *, options, cancel=None):
            try:
                for piece in super().chat(messages, options=options, cancel=cancel):
                    self.generated += 1
                    yield piece
            finally:
                self.closed.set()

    server = Counting()
    with serve(create_app(server)) as base:
        engine = HttpEngine(RemoteConfig(base, first_byte_s=60))
        cancel = threading.Event()
        request = TurnRequest(options=ChatOptions(max_tokens=300), turn=1)
        seen = 0
        events = []
        for ev in engine.turn(speech60.slice(0, 2.3), request, cancel=cancel):
            events.append(ev)
            if isinstance(ev, ReplyToken):
                seen += 1
                if seen == 3:
                    cancel.set()  # Stop
                    at_stop = server.generated
        assert server.closed.wait(10), "the server kept generating after the client left"
        # A few tokens of slack: the client shuts its socket within 20 ms, the server notices the
        # disconnect, and the runner stops at its next token (~10 ms each here).
        assert server.generated - at_stop <= 5, (at_stop, server.generated)
        assert isinstance(events[-1], TurnDone) and isinstance(events[-2], ReplyText) and events[-2].cancelled
