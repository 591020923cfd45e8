import json
import threading

import numpy as np
import pytest

from cloud.engine import LocalEngine
from cloud.pipeline import Pipeline, file_source, reply_audio
from local import SAMPLE
from cloud.vad import Segmenter
from shared.config import Config
from shared.errors import EngineError, MoiError
from shared.events import (
    ErrorEvent,
    MeterTick,
    ReplyAudio,
    ReplyText,
    ReplyToken,
    SpeechEnded,
    SpeechStarted,
    Transcript,
    TurnDone,
    to_dict,
)
from tests.conftest import words

CFG = Config.load(env={}, llm__max_tokens=24)


@pytest.fixture(scope="module")
def engine(runners):
    return LocalEngine(CFG, runners)


def run(engine, vad_model, variant, source=SAMPLE):
    pipe = Pipeline(engine, Segmenter(vad_model, CFG.vad), CFG, variant)
    return pipe, list(pipe.run(file_source(source)))


@pytest.fixture(scope="module")
def echo_events(engine, vad_model):
    return run(engine, vad_model, "echo")[1]


@pytest.fixture(scope="module")
def transcribe_events(engine, vad_model):
    return run(engine, vad_model, "transcribe")[1]


def test_chat_pipeline_emits_its_events_in_order(engine, vad_model):
    pipe, events = run(engine, vad_model, "chat")
    kinds = [type(e) for e in events if not isinstance(e, MeterTick)]
    # the sample: clicks and hum, then "...how do I get to Dublin? And the answer..."
    first_turn = kinds[: kinds.index(TurnDone) + 1]
    assert first_turn[:3] == [SpeechStarted, SpeechEnded, Transcript]
    assert ReplyToken in first_turn and ReplyAudio in first_turn and ReplyText in first_turn
    assert first_turn.index(ReplyToken) < first_turn.index(ReplyAudio)
    assert not any(isinstance(e, ErrorEvent) for e in events)
    ts = [e.t for e in events]
    assert ts == sorted(ts)  # one monotonic clock
    transcripts = [e for e in events if isinstance(e, Transcript)]
    assert "dublin" in words(transcripts[0].text)
    done = [e for e in events if isinstance(e, TurnDone)]
    assert len(done) == len(transcripts) == pipe.turns >= 1
    for d in done:
        assert d.engine == "local"
        assert {"stt", "llm_first_token", "llm", "tts_first", "first_audio", "total"} <= d.timings.keys()
        assert all(v >= 0 for v in d.timings.values())
        assert d.timings["first_audio"] <= d.timings["total"]
    replies = [e for e in events if isinstance(e, ReplyText)]
    tokens = "".join(e.text for e in events if isinstance(e, ReplyToken) and e.turn == 1).strip()
    assert replies[0].text == tokens and tokens
    assert len(pipe.thread.messages()) == 1 + 2 * len(replies)  # system + each exchange


def test_meter_ticks_are_steady_and_see_the_vad(transcribe_events):
    events = transcribe_events
    for stage in ("pre", "post"):
        ticks = [e for e in events if isinstance(e, MeterTick) and e.stage == stage]
        assert len(ticks) == pytest.approx(11.0 / 0.05, abs=12)  # 11 s sample, 50 ms ticks
        gaps = np.diff([e.audio_t for e in ticks])
        assert np.allclose(gaps, 0.05, atol=1e-6)
    pre = {round(e.audio_t, 2): e.rms_db for e in events if isinstance(e, MeterTick) and e.stage == "pre"}
    post = {round(e.audio_t, 2): e.rms_db for e in events if isinstance(e, MeterTick) and e.stage == "post"}
    clicks = [t for t in pre if 1.2 < t < 2.5]
    assert max(pre[t] for t in clicks) > -60  # the clicks are loud before the VAD...
    assert max(post[t] for t in clicks) < -100  # ...and gone after it
    speech = [t for t in post if 4.0 < t < 9.0]
    assert np.median([post[t] for t in speech]) > -40


def test_transcribe_variant_stops_at_the_transcript(transcribe_events):
    events = transcribe_events
    assert any(isinstance(e, Transcript) and e.text for e in events)
    assert not any(isinstance(e, (ReplyToken, ReplyAudio, ReplyText)) for e in events)


def test_echo_speaks_back_what_it_heard(echo_events, stt):
    events = echo_events
    heard = [e for e in events if isinstance(e, Transcript)][0]
    spoken = reply_audio([e for e in events if isinstance(e, ReplyAudio) and e.turn == heard.turn])
    assert spoken is not None and spoken.sample_rate == 24_000
    assert not any(isinstance(e, ReplyToken) for e in events)
    back = words(stt.transcribe(spoken).text)
    assert len(back & words(heard.text)) >= 0.7 * len(words(heard.text))


def test_events_serialize_generically(echo_events):
    dicts = [to_dict(e) for e in echo_events]
    assert {d["type"] for d in dicts} >= {"meter", "speech_start", "speech_end", "transcript", "reply", "reply_audio", "turn_done"}
    audio = next(d for d in dicts if d["type"] == "reply_audio")["audio"]
    assert audio["sample_rate"] == 24_000 and audio["seconds"] > 0.2


class BrokenEngine(LocalEngine):
    """Not a model: the real engine, but its chat fails (with ``error``), to check a failed turn
    ends cleanly and the run goes on."""

    def __init__(self, real, error):
        super().__init__(real.cfg, real.runners)
        self.error = error

    def chat(self, messages, *, options, cancel=None):
        raise self.error


@pytest.mark.parametrize("error", [EngineError("chat backend unavailable"), KeyError("segments")])
def test_a_failed_turn_is_reported_and_the_run_goes_on(engine, vad_model, error):
    pipe = Pipeline(BrokenEngine(engine, error), Segmenter(vad_model, CFG.vad), CFG, "chat")
    events = list(pipe.run(file_source(SAMPLE)))
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    expected = "chat backend unavailable" if isinstance(error, EngineError) else "KeyError: 'segments'"
    assert errors and all(expected in e.message for e in errors), errors
    assert pipe.failures == len(errors) == len([e for e in events if isinstance(e, Transcript) and e.text])
    assert [e.turn for e in errors] == [e.turn for e in events if isinstance(e, Transcript) and e.text]
    assert len(pipe.thread) == 0  # no exchange was answered: nothing joined the thread


def test_stop_cancels_the_reply(engine, vad_model):
    pipe = Pipeline(engine, Segmenter(vad_model, CFG.vad), CFG, "chat")
    events, stop = [], threading.Event()
    for ev in pipe.run(file_source(SAMPLE), cancel=stop):
        events.append(ev)
        if isinstance(ev, ReplyToken):
            stop.set()  # Stop pressed as soon as the reply starts
    replies = [e for e in events if isinstance(e, ReplyText)]
    assert replies and all(r.cancelled for r in replies)
    assert not any(isinstance(e, ReplyAudio) for e in events)
    assert all(len(r.text.split()) <= 2 for r in replies)


def test_unknown_variant():
    with pytest.raises(MoiError, match="unknown pipeline"):
        Pipeline(None, None, CFG, "karaoke")


def test_ending_turns_with_the_turn_model_keeps_the_lectures_words(engine, vad_model):
    """Smart Turn moves where utterances end; what Whisper hears of the lecture stays as good as
    with the 500 ms silence rule (word error rate against the reference, within +0.02)."""
    import jiwer

    from cloud.turn_end import SmartTurn
    from shared.models import resolve
    from shared.text import spoken_words
    from tests.conftest import audio_file

    reference = " ".join(spoken_words(json.loads(audio_file("transcripts.json").read_text())["speech_60s_16k.wav"]))
    lecture = audio_file("speech_60s_16k.wav")
    heard = {}
    for name, turn_end in (("silence", None), ("model", SmartTurn(resolve("turn").path))):
        pipe = Pipeline(engine, Segmenter(vad_model, CFG.vad, turn_end), CFG, "transcribe")
        text = " ".join(e.text for e in pipe.run(file_source(lecture)) if isinstance(e, Transcript))
        heard[name] = jiwer.wer(reference, " ".join(spoken_words(text)))
    assert heard["model"] <= heard["silence"] + 0.02, heard
