"""One contract, every engine: the same turns from real recordings give the same events.

Engines: in-process (LocalEngine), HTTP against a real `moi serve` process on loopback (one
request per turn), a fallback pair whose primary dies after the transcript of every turn, and
the Modal engine with its GPU classes run in this process through Modal's ``.local()`` (the only
double: the Modal call itself). All answer with the same offline models, prompts evaluated whole
(``reuse_prefix`` off) so replies can be compared word for word.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from cloud.engine import LocalEngine
from cloud.http import create_app
from local.remote import Breaker, FallbackEngine, HttpEngine, RemoteConfig
from shared.config import Config
from shared.engine import TurnRequest
from shared.events import FallbackUsed, ReplyAudio, ReplyText, ReplyToken, Transcript, TurnDone
from shared.messages import ChatOptions, Thread
from tests.conftest import ROOT, serve, words
from tests.local.test_remote import Faults, _free_port

TOKENS = 24
ENV = {"MOI_LLM_MAX_TOKENS": str(TOKENS), "MOI_LLM_REUSE_PREFIX": "0"}
CFG = Config.load(env=ENV)
QUESTIONS = [(0.0, 2.3), (2.4, 7.1)]  # "and says, how do I get to Dublin?" · "And the answer that comes back…"


@pytest.fixture(scope="module")
def utterances(speech60):
    return [speech60.slice(a, b) for a, b in QUESTIONS]


@pytest.fixture(scope="module")
def local(runners):
    return LocalEngine(CFG, runners)


@pytest.fixture(scope="module")
def served():
    """A real `moi serve` process on loopback."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "local.cli", "serve", "--port", str(port)],
                            cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    probe = HttpEngine(RemoteConfig(url))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not probe.health():
        time.sleep(0.25)
    assert probe.health(), proc.stderr.read().decode() if proc.poll() is not None else "moi serve did not start"
    yield url
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def modal_engine():
    modal_app = pytest.importorskip("modal_app")
    from tests.test_modal_app import FakeStops

    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)  # read by each class's Config.load() in its @modal.enter
        mp.setattr(modal_app, "STOPS", FakeStops())  # the stop flags, in this process
        engine = modal_app.ModalEngine(modal_app.Voice(device="cpu"), local=True)
        engine.voices()  # runs Voice's @modal.enter under this environment
        yield engine


@pytest.fixture(scope="module")
def cut_gateway(local):
    faults = Faults(create_app(local))
    faults.mode = "cut"
    with serve(faults) as url:
        yield url


def engine_for(kind, request):
    if kind == "local":
        return request.getfixturevalue("local")
    if kind == "http":
        return HttpEngine(RemoteConfig(request.getfixturevalue("served"), first_byte_s=120))
    if kind == "fallback":
        primary = HttpEngine(RemoteConfig(request.getfixturevalue("cut_gateway"), first_byte_s=120))
        return FallbackEngine(primary, request.getfixturevalue("local"), Breaker(cooldown_s=0))
    return request.getfixturevalue("modal_engine")


def converse(engine, utterances):
    """Two turns of one conversation, as the pipeline holds it: each turn's events."""
    thread = Thread(CFG.llm.system_prompt, CFG.llm.max_turns)
    turns = []
    for n, audio in enumerate(utterances, 1):
        request = TurnRequest(tuple(thread.messages()), ChatOptions(max_tokens=TOKENS), turn=n)
        events = list(engine.turn(audio, request, cancel=threading.Event()))
        heard = next(e.text for e in events if isinstance(e, Transcript))
        thread.add_exchange(heard, next(e.text for e in events if isinstance(e, ReplyText)))
        turns.append(events)
    return turns


@pytest.fixture(scope="module")
def reference(local, utterances):
    return converse(local, utterances)


@pytest.mark.parametrize("kind", ["local", "http", "fallback", "modal"])
def test_every_engine_answers_the_same_turns_the_same_way(kind, request, utterances, reference):
    engine = engine_for(kind, request)
    turns = converse(engine, utterances)
    for n, (events, ref) in enumerate(zip(turns, reference), 1):
        kinds = [type(e) for e in events]
        assert kinds[0] is Transcript and kinds[-2:] == [ReplyText, TurnDone], kinds
        middle = kinds[1:-2]
        if kind == "fallback":  # the primary died after its transcript: the rest is local, said once
            assert middle[0] is FallbackUsed and middle.count(FallbackUsed) == 1
            middle = middle[1:]
        assert set(middle) == {ReplyToken, ReplyAudio}, middle
        assert all(e.turn == n for e in events)
        transcript, reply, done = events[0], events[-2], events[-1]
        ref_transcript, ref_reply = ref[0], ref[-2]
        assert transcript.text == ref_transcript.text
        assert n != 1 or "dublin" in words(transcript.text)
        assert reply.text == ref_reply.text and reply.text and not reply.cancelled
        assert reply.text == "".join(e.text for e in events if isinstance(e, ReplyToken)).strip()
        spoken = " ".join(e.text for e in events if isinstance(e, ReplyAudio))
        assert spoken.split() == reply.text.split()  # every word spoken, none twice
        assert done.engine == {"local": "local", "http": "remote", "fallback": "remote → local",
                               "modal": "modal · SmolLM2-135M-Instruct Q8_0"}[kind]
        assert 0 <= done.timings["first_audio"] <= done.timings["total"]


def test_the_system_prompt_is_sent_once_as_the_system_message(local, utterances, modal_engine):
    """On every engine the model sees the conversation as the client holds it: one system
    message, first, then the exchanges, then the new utterance."""
    seen: list[list] = []

    class Spy(LocalEngine):
        def chat(self, messages, *, options, cancel=None):
            seen.append(list(messages))
            return super().chat(messages, options=options, cancel=cancel)

    spy = Spy(CFG, local.runners)
    original = LocalEngine.chat

    def container_spy(self, messages, *, options, cancel=None):  # the Voice container's engine, in-process
        seen.append(list(messages))
        return original(self, messages, options=options, cancel=cancel)

    with serve(create_app(spy)) as url:
        for engine in (spy, HttpEngine(RemoteConfig(url, first_byte_s=120)), modal_engine):
            seen.clear()
            with pytest.MonkeyPatch.context() as mp:
                if engine is modal_engine:
                    mp.setattr(LocalEngine, "chat", container_spy)
                turns = converse(engine, utterances)
            assert len(seen) == 2
            for messages, n in zip(seen, (1, 2)):
                roles = [m.role for m in messages]
                assert roles == ["system"] + ["user", "assistant"] * (n - 1) + ["user"], roles
                assert messages[0].content == CFG.llm.system_prompt
                assert sum(CFG.llm.system_prompt in m.content for m in messages) == 1
            assert seen[1][-1].content == turns[1][0].text and seen[1][2].content == turns[0][-2].text
