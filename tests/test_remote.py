"""--remote: RemoteEngine against the real gateway on loopback, and failover under faults."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cloud.http import RunnerBackend, create_app
from local.cli import SAMPLE
from local.engine import LocalEngine
from local.pipeline import Pipeline, file_source
from local.remote import Breaker, FallbackEngine, RemoteConfig, RemoteEngine
from local.vad import Segmenter
from shared.audio import Audio
from shared.config import Config
from shared.errors import EngineError
from shared.events import ErrorEvent, FallbackUsed, ReplyText, ReplyToken, Transcript, TurnDone
from shared.messages import ChatOptions, Thread
from tests.conftest import ROOT, serve, words

CFG = Config.load(env={}, llm__max_tokens=20)
KEY = "remote-key"


@pytest.fixture(scope="module")
def local(runners):
    return LocalEngine(CFG, runners)


class Faults:
    """Not a model: an ASGI wrapper in front of the real gateway that can fail on demand."""

    def __init__(self, app):
        self.app = app
        self.mode = "ok"  # ok | 500 | slow
        self.requests = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            self.requests += 1
            if self.mode == "500":
                await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"error": {"message": "injected", "type": "server_error"}}'})
                return
            if self.mode == "slow":
                await asyncio.sleep(3.0)
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def faults(runners):
    return Faults(create_app(RunnerBackend(runners), api_key=KEY))


@pytest.fixture(scope="module")
def url(faults):
    with serve(faults) as u:
        yield u


@pytest.fixture()
def remote(url, faults):
    faults.mode = "ok"
    engine = RemoteEngine(RemoteConfig(url, KEY, first_byte_s=60))
    yield engine
    engine.close()


def run(engine, utterances=None):
    pipe = Pipeline(engine, Segmenter(_vad(), CFG.vad), CFG, "chat")
    return pipe, [e for e in pipe.run(file_source(SAMPLE)) if not hasattr(e, "rms_db")]


def _vad():
    from local.vad import SileroVad
    from shared.models import resolve

    return SileroVad(resolve("vad").path)


def test_remote_gives_the_same_transcript_and_reply_as_local(remote, local, speech60):
    clip = speech60.slice(0, 7)
    assert remote.transcribe(clip).text == local.transcribe(clip).text
    thread = Thread(CFG.llm.system_prompt)
    thread.add_user("How do I get to Dublin?")
    opts = ChatOptions(max_tokens=20)
    assert "".join(remote.chat(thread.messages(), options=opts)) == "".join(local.chat(thread.messages(), options=opts))
    r = list(remote.speak("Hello there."))
    l = list(local.speak("Hello there."))
    assert abs(sum(a.seconds for a in r) - sum(a.seconds for a in l)) < 0.05
    assert r[0].sample_rate == 24_000


def test_remote_errors_are_engine_errors(url):
    bad = RemoteEngine(RemoteConfig(url, "wrong-key"))
    with pytest.raises(EngineError, match="HTTP 401"):
        bad.transcribe(Audio.silence(1.0))
    gone = RemoteEngine(RemoteConfig("http://127.0.0.1:9", KEY, connect_timeout_s=0.5))
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
    before = faults.requests
    _, again = run(engine)
    assert answered_once(again)
    assert [e.engine for e in again if isinstance(e, TurnDone)] == ["remote"] * len([e for e in again if isinstance(e, TurnDone)])
    assert faults.requests > before and breaker.state == "closed"


def test_a_remote_slower_than_the_deadline_falls_back(url, local, faults):
    faults.mode = "slow"  # 3 s before any answer, as a cold start would be
    engine = FallbackEngine(RemoteEngine(RemoteConfig(url, KEY, first_byte_s=1.0)), local)
    started = time.monotonic()
    _, events = run(engine)
    assert answered_once(events)
    fell = [e for e in events if isinstance(e, FallbackUsed)]
    assert fell and "Timeout" in fell[0].reason
    assert time.monotonic() - started < 60


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
    probe = RemoteEngine(RemoteConfig(url, KEY))
    deadline = time.monotonic() + 240  # three models load before it listens; slow on a busy machine
    while time.monotonic() < deadline and proc.poll() is None and not probe.health():
        time.sleep(0.25)
    assert probe.health(), proc.stderr.read().decode() if proc.poll() is not None else "moi serve did not start"
    yield proc, url
    proc.kill()
    proc.wait()


def test_server_killed_mid_turn(served, local):
    proc, url = served
    engine = FallbackEngine(RemoteEngine(RemoteConfig(url, KEY, first_byte_s=5)), local)
    pipe = Pipeline(engine, Segmenter(_vad(), CFG.vad), CFG, "chat")
    events = []
    for ev in pipe.run(file_source(SAMPLE)):
        events.append(ev)
        if isinstance(ev, Transcript) and ev.turn == 1:
            proc.send_signal(signal.SIGKILL)  # the gateway dies between transcript and reply
            proc.wait()
    first = [e for e in events if getattr(e, "turn", None) == 1]
    assert [type(e) for e in first if isinstance(e, (Transcript, ReplyText, TurnDone))] == [Transcript, ReplyText, TurnDone]
    assert [e.engine for e in first if isinstance(e, TurnDone)] == ["remote → local"]
    assert "dublin" in words(next(e.text for e in first if isinstance(e, Transcript)))
    assert answered_once(events)


def test_server_killed_mid_reply_ends_the_turn_without_repeating(served, local):
    proc, url = served
    engine = FallbackEngine(RemoteEngine(RemoteConfig(url, KEY, first_byte_s=5)), local, Breaker(cooldown_s=3600))
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
    assert errors and errors[0].turn == 1 and "mid-reply" in errors[0].message, [e for e in events if isinstance(e, (FallbackUsed, TurnDone, ReplyText, ErrorEvent))]
    assert not any(isinstance(e, ReplyText) and e.turn == 1 for e in events)  # no second, local reply
    later = [e for e in events if isinstance(e, TurnDone)]
    assert later and all(e.engine == "local (remote down)" for e in later)  # the next turns go on locally
