"""/v1/realtime driven by the official ``openai`` SDK's realtime client, on the real models:
a recorded question in, its transcript and spoken reply out (server VAD and manual turns),
cancel mid reply, typed messages, bad input, auth, several connections at once."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from openai import AsyncOpenAI

from cloud.engine import LocalEngine
from cloud.http import Limits, create_app
from shared.audio import Audio
from shared.config import Config
from tests.conftest import serve, words

KEY = "rt-key"
CFG = Config.load(env={}, llm__reuse_prefix=False)
RATE = 24_000


@pytest.fixture(scope="module")
def engine(runners):
    engine = LocalEngine(CFG, runners)
    engine.warm()
    return engine


@pytest.fixture(scope="module")
def base(engine):
    with serve(create_app(engine, api_key=KEY, cfg=CFG)) as url:
        yield url


@pytest.fixture(scope="module")
def question(speech60) -> Audio:
    """"and says, how do I get to Dublin?" (~2.3 s), as a Realtime client sends it: 24 kHz."""
    return speech60.slice(0.0, 2.3).resample(RATE)


def chunks(audio: Audio, seconds: float = 0.1) -> list[str]:
    pcm = audio.resample(RATE).to_pcm16()
    step = int(seconds * RATE) * 2
    return [base64.b64encode(pcm[i : i + step]).decode() for i in range(0, len(pcm), step)]


def run(coro, timeout: float = 180.0):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, timeout))


def connect(base: str, key: str = KEY):  # noqa: ANN201
    return AsyncOpenAI(base_url=f"{base}/v1", api_key=key).realtime.connect(model="moi")


async def until(conn, kind: str, seen: list) -> object:  # noqa: ANN001
    """Events until one of type ``kind`` (returned); every one is kept in ``seen``."""
    async for ev in conn:
        seen.append(ev)
        if ev.type == kind:
            return ev
    raise AssertionError(f"the connection ended before {kind}")


def reply_audio(seen: list, response_id: str) -> np.ndarray:
    pcm = b"".join(base64.b64decode(e.delta) for e in seen
                   if e.type == "response.output_audio.delta" and e.response_id == response_id)
    return np.frombuffer(pcm, "<i2")


def test_a_spoken_question_is_answered_with_server_vad(base, question):
    async def talk():
        seen: list = []
        async with connect(base) as conn:
            created = await until(conn, "session.created", seen)
            assert created.session.audio.input.turn_detection.type == "server_vad"
            for b64 in chunks(Audio.concat([Audio.silence(0.3, RATE), question, Audio.silence(1.5, RATE)])):
                await conn.input_audio_buffer.append(audio=b64)
            done = await until(conn, "response.done", seen)
        return seen, done

    seen, done = run(talk())
    kinds = [e.type for e in seen]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
                 "response.created", "response.output_audio_transcript.delta", "response.output_audio.delta",
                 "response.output_audio_transcript.done", "response.output_item.done"):
        assert kind in kinds, kind
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
    heard = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert {"get", "dublin"} <= words(heard.transcript)
    committed = next(e for e in seen if e.type == "input_audio_buffer.committed")
    assert heard.item_id == committed.item_id
    assert done.response.status == "completed"
    said = next(e for e in seen if e.type == "response.output_audio_transcript.done").transcript
    assert said.strip() and done.response.output[0].content[0].transcript == said.strip()
    audio = reply_audio(seen, done.response.id)
    assert len(audio) > 0.5 * RATE and np.abs(audio).max() > 1000  # real speech at 24 kHz, not silence
    assert float(done.response.metadata["stt"]) > 0


def test_manual_turns_commit_then_respond_and_typed_messages_join_the_thread(base, question):
    async def talk():
        seen: list = []
        async with connect(base) as conn:
            await conn.session.update(session={"type": "realtime", "instructions": "You are terse.",
                                               "audio": {"input": {"turn_detection": None}}})
            updated = await until(conn, "session.updated", seen)
            assert updated.session.audio.input.turn_detection is None
            assert updated.session.instructions == "You are terse."
            for b64 in chunks(question):
                await conn.input_audio_buffer.append(audio=b64)
            await conn.input_audio_buffer.commit()
            committed = await until(conn, "input_audio_buffer.committed", seen)
            await asyncio.sleep(1.0)  # nothing is answered until asked
            assert not any(e.type == "response.created" for e in seen)
            await conn.response.create()
            first = await until(conn, "response.done", seen)
            # a typed message, answered with the spoken turn as context
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "Say that again."}]})
            added = await until(conn, "conversation.item.added", seen)
            await conn.response.create()
            second = await until(conn, "response.done", seen)
            await conn.conversation.item.delete(item_id=added.item.id)
            deleted = await until(conn, "conversation.item.deleted", seen)
        return seen, committed, first, second, deleted, added

    seen, committed, first, second, deleted, added = run(talk())
    heard = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert heard.item_id == committed.item_id and "dublin" in words(heard.transcript)
    assert first.response.status == second.response.status == "completed"
    assert len(reply_audio(seen, first.response.id)) > 0 and len(reply_audio(seen, second.response.id)) > 0
    assert second.response.output[0].content[0].transcript.strip()
    assert deleted.item_id == added.item.id


def test_cancel_mid_reply_stops_it_and_the_connection_goes_on(base, question):
    async def talk():
        seen: list = []
        async with connect(base) as conn:
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}},
                                               "max_output_tokens": 120})
            await until(conn, "session.updated", seen)
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Tell me a long story about a dragon who learns to cook."}]})
            await conn.response.create()
            first = await until(conn, "response.output_audio.delta", seen)
            await conn.response.cancel()
            done = await until(conn, "response.done", seen)
            after: list = []
            try:  # nothing more of it comes
                await asyncio.wait_for(until(conn, "response.output_audio.delta", after), 2.0)
            except asyncio.TimeoutError:
                pass
            for b64 in chunks(question):
                await conn.input_audio_buffer.append(audio=b64)
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            again = await until(conn, "response.done", seen)
        return seen, first, done, after, again

    seen, first, done, after, again = run(talk())
    assert done.response.id == first.response_id and done.response.status == "cancelled"
    assert not [e for e in after if getattr(e, "response_id", None) == first.response_id]
    said = next(e for e in seen if e.type == "response.output_audio_transcript.done"
                and e.response_id == first.response_id).transcript
    assert len(said.split()) < 100  # cut off well before its 120 tokens
    assert again.response.status == "completed"


def test_bad_input_gets_error_events_and_the_connection_stays_usable(base):
    async def talk():
        seen: list = []
        async with connect(base) as conn:
            await until(conn, "session.created", seen)
            await conn.input_audio_buffer.append(audio="not base64!!")
            bad_b64 = await until(conn, "error", seen)
            await conn.send({"type": "no.such.event"})  # type: ignore[arg-type]
            unknown = await until(conn, "error", seen)
            await conn.response.cancel()
            idle_cancel = await until(conn, "error", seen)
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await until(conn, "session.updated", seen)
            await conn.input_audio_buffer.commit()
            empty = await until(conn, "error", seen)
            await conn.session.update(session={"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcmu"}}}})
            fmt = await until(conn, "error", seen)
            for b64 in chunks(Audio.silence(CFG.vad.max_utterance_s + 1.0, RATE), seconds=1.0):
                await conn.input_audio_buffer.append(audio=b64)
            too_long = await until(conn, "error", seen)
            await conn.session.update(session={"type": "realtime", "instructions": "Still here."})
            alive = await until(conn, "session.updated", seen)
        return bad_b64, unknown, idle_cancel, empty, fmt, too_long, alive

    bad_b64, unknown, idle_cancel, empty, fmt, too_long, alive = run(talk())
    assert bad_b64.error.code == "invalid_base64"
    assert unknown.error.code == "unknown_event" and "no.such.event" in unknown.error.message
    assert idle_cancel.error.code == "response_cancel_not_active"
    assert empty.error.code == "input_audio_buffer_commit_empty"
    assert fmt.error.code == "unsupported"
    assert too_long.error.code == "audio_too_long"
    assert alive.session.instructions == "Still here."


def test_a_wrong_key_is_refused_at_the_handshake(base):
    async def talk():
        async with connect(base, key="wrong") as conn:
            await conn.recv()

    with pytest.raises(Exception) as refused:
        run(talk(), timeout=30)
    assert "403" in str(refused.value)


def test_several_connections_at_once_each_get_their_own_answer(base, question, speech60):
    other = speech60.slice(2.4, 7.1).resample(RATE)

    async def one(audio: Audio):
        seen: list = []
        async with connect(base) as conn:
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await until(conn, "session.updated", seen)
            for b64 in chunks(audio):
                await conn.input_audio_buffer.append(audio=b64)
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            done = await until(conn, "response.done", seen)
        heard = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
        return heard.transcript, done.response.status

    async def both():
        return await asyncio.gather(one(question), one(other))

    (first, s1), (second, s2) = run(both(), timeout=300)
    assert s1 == s2 == "completed"
    assert "dublin" in words(first) and "dublin" not in words(second) and len(second.split()) > 4


def test_past_the_connection_limit_the_server_says_it_is_busy(engine):
    async def talk(base):
        async with connect(base) as first:
            seen: list = []
            await until(first, "session.created", seen)
            async with connect(base) as second:
                return json.loads(await second.recv_bytes())

    with serve(create_app(engine, api_key=KEY, cfg=CFG, limits=Limits(realtime_sessions=1))) as base:
        busy = run(talk(base), timeout=60)
    assert busy["type"] == "error" and busy["error"]["code"] == "server_busy"


def test_speech_over_a_reply_cancels_it_and_is_answered_with_what_came_before(base, question, speech60):
    """Server VAD, as the live client: speaking while a reply streams stops it (its response is
    done, cancelled), and the next response answers what the person said."""
    more = speech60.slice(2.4, 7.1).resample(RATE)  # "And the answer that comes back is, well, ..."

    async def talk():
        seen: list = []
        async with connect(base) as conn:
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 200})
            await until(conn, "session.updated", seen)
            for b64 in chunks(Audio.concat([Audio.silence(0.3, RATE), question, Audio.silence(1.5, RATE)])):
                await conn.input_audio_buffer.append(audio=b64)
            first = await until(conn, "response.output_audio.delta", seen)
            for b64 in chunks(Audio.concat([more, Audio.silence(1.5, RATE)])):
                await conn.input_audio_buffer.append(audio=b64)
            done = [await until(conn, "response.done", seen)]
            while done[-1].response.id == first.response_id or done[-1].response.status != "completed":
                done.append(await until(conn, "response.done", seen))
        return seen, first, done

    seen, first, done = run(talk(), timeout=300)
    assert done[0].response.id == first.response_id and done[0].response.status == "cancelled"
    heard = [e.transcript for e in seen if e.type == "conversation.item.input_audio_transcription.completed"]
    assert "comes" in words(heard[-1]) and done[-1].response.status == "completed"


def test_a_client_that_goes_away_stops_the_work(base):
    """Disconnecting mid-reply closes the session: its threads (capture, the machine, the
    workers, the turn's LLM and TTS threads) are gone within a few seconds."""
    import threading
    import time

    def moi_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("moi-")}

    before = moi_threads()  # an earlier test's session may still be ending: threads, not names

    async def talk():
        seen: list = []
        async with connect(base) as conn:
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 300})
            await until(conn, "session.updated", seen)
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Tell me a long story about a dragon who learns to cook."}]})
            await conn.response.create()
            await until(conn, "response.output_audio.delta", seen)
            return moi_threads() - before  # the connection goes away here, mid-reply

    mine = run(talk())
    assert {"moi-answer", "moi-conversation"} <= {t.name for t in mine}
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in mine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [t.name for t in mine if t.is_alive()]


def test_the_playhead_says_what_a_stop_left_unheard():
    """A cancel mid-reply: the thread keeps what the client heard (cloud.conversation); an audio
    session has not heard what was still to play, a text session has read every piece."""
    from cloud.realtime import Playhead

    audio, text = Playhead(), Playhead(lambda: False)
    for head in (audio, text):
        head.play(Audio.silence(2.0))
        assert head.playing
    assert 1.5 < audio.stop() <= 2.0 and not audio.playing
    assert text.stop() == 0.0 and not text.playing and audio.stop() == 0.0
