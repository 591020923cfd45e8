import numpy as np
import pytest

from cloud.meter import FLOOR_DB, LevelMeter, measure
from cloud.vad import WINDOW, Segmenter, SpeechEnd, SpeechStart
from shared.audio import SPEECH_RATE, Audio
from shared.config import VadConfig
from shared.errors import AudioError, ConfigError
from tests.conftest import noise, words

CLATTER_SPEECH = [(3.0, 10.5), (13.0, 21.0)]  # from tests/data/README.md


def run(seg: Segmenter, audio: Audio, chunk: int = 1600) -> list[SpeechStart | SpeechEnd]:
    seg.reset()
    events = []
    for i in range(0, len(audio), chunk):
        events += seg.feed(audio.samples[i : i + chunk])
    return events + seg.flush()


def utterances(events):
    return [e for e in events if isinstance(e, SpeechEnd) and not e.dropped]


def test_finds_the_speech_in_a_lecture(vad_model, speech60):
    ends = utterances(run(Segmenter(vad_model), speech60))
    assert len(ends) >= 4
    covered = sum(e.audio.seconds for e in ends)
    assert 40 < covered <= 60  # a lecture with natural pauses: mostly speech
    starts = [e.start for e in ends]
    assert starts == sorted(starts)
    for a, b in zip(ends, ends[1:]):
        assert a.at <= b.start  # utterances never overlap


def test_clatter_file_speech_only_where_the_timeline_says(vad_model, clatter):
    ends = utterances(run(Segmenter(vad_model), clatter))
    assert ends
    for e in ends:  # each utterance lies within a speech stretch (plus padding)
        assert any(lo - 0.5 <= e.start and e.at <= hi + 0.5 for lo, hi in CLATTER_SPEECH), (e.start, e.at)
    for lo, hi in CLATTER_SPEECH:  # and each stretch is mostly found
        found = sum(max(0.0, min(e.at, hi) - max(e.start, lo)) for e in ends)
        assert found > 0.85 * (hi - lo)


@pytest.mark.parametrize("span", [(0.0, 1.0), (1.0, 3.0), (10.6, 12.0), (12.0, 13.0), (21.2, 24.5)])
def test_no_speech_in_hum_clicks_and_silence(vad_model, clatter, span):
    events = run(Segmenter(vad_model), clatter.slice(*span))
    assert utterances(events) == []


def test_no_speech_in_generated_noise(vad_model, rng):
    t = np.arange(5 * SPEECH_RATE) / SPEECH_RATE
    hum = Audio((0.3 * np.sin(2 * np.pi * 50 * t) + 0.1 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), SPEECH_RATE)
    clicks = np.zeros(5 * SPEECH_RATE, np.float32)
    clicks[rng.integers(0, len(clicks) - 40, 60)] = 0.9
    for audio in (noise(rng, 5.0, 0.05), noise(rng, 5.0, 0.3), hum, Audio(clicks, SPEECH_RATE), Audio.silence(5.0)):
        assert utterances(run(Segmenter(vad_model), audio)) == []


def test_padding_keeps_word_starts_and_ends(vad_model, speech60, stt):
    """Padded utterances begin and end in the pause around the words (50 ms edges far below
    the utterance's level); without padding they begin mid-word."""

    def edges(cfg):
        out = []
        for u in utterances(run(Segmenter(vad_model, cfg), speech60)):
            if 0.0 < u.start and u.at < speech60.seconds:  # not cut by the file's own ends
                level = measure(u.audio.samples).rms_db
                out.append((measure(u.audio.samples[:800]).rms_db - level, measure(u.audio.samples[-800:]).rms_db - level))
        return out

    padded = edges(VadConfig(pre_roll_ms=300, post_roll_ms=200))
    bare = edges(VadConfig(pre_roll_ms=0, post_roll_ms=0))
    assert len(padded) >= 4
    assert all(head < -20 and tail < -20 for head, tail in padded), padded
    assert np.median([head for head, _ in bare]) > -15, bare  # the check can tell the difference
    first = utterances(run(Segmenter(vad_model), speech60.slice(0, 4)))[0]
    assert {"and", "says"} <= words(stt.transcribe(first.audio).text)


def test_chunk_size_does_not_change_the_result(vad_model, clatter):
    a = [(round(e.start, 3), round(e.at, 3)) for e in utterances(run(Segmenter(vad_model), clatter, 160))]
    b = [(round(e.start, 3), round(e.at, 3)) for e in utterances(run(Segmenter(vad_model), clatter, 48000))]
    assert a == b and a


def test_rejects_wrong_rate_and_bad_config(vad_model):
    with pytest.raises(AudioError, match="16000 Hz"):
        Segmenter(vad_model).feed(Audio(np.zeros(800, np.float32), 8000))
    with pytest.raises(ConfigError):
        Segmenter(vad_model, VadConfig(threshold=0.3, release=0.5))
    with pytest.raises(ConfigError, match="over_reply_threshold"):  # speech over moi must start above release too
        Segmenter(vad_model, VadConfig(over_reply_threshold=0.3, release=0.35))
    for bad in ({"turn_threshold": 2.0}, {"turn_threshold": 0.0}, {"turn_silence_ms": 0}):
        with pytest.raises(ConfigError, match="turn_"):  # a threshold of 2 would switch the model off unseen
            Segmenter(vad_model, VadConfig(**bad))
    with pytest.raises(ConfigError, match="speculate_ms"):
        Segmenter(vad_model, VadConfig(speculate_ms=-1))


class ScriptedVad:
    """Not a model: replays a probability per window, to test the state machine alone."""

    def __init__(self, probs):
        self.probs = list(probs)
        self.i = 0

    def reset(self):
        self.i = 0

    def __call__(self, frame):
        assert frame.shape == (1, 64 + WINDOW)
        p = self.probs[self.i] if self.i < len(self.probs) else 0.0
        self.i += 1
        return p


def scripted(probs, **cfg):
    """Run the segmenter on a ramp signal (sample value = its index) with scripted probs."""
    n = len(probs) * WINDOW
    audio = Audio(np.arange(n, dtype=np.float32) / n, SPEECH_RATE)
    seg = Segmenter(ScriptedVad(probs), VadConfig(**cfg))
    return run(seg, audio, 1000), audio


def test_hysteresis_keeps_speech_between_release_and_threshold():
    probs = [0.0] * 10 + [0.9] * 20 + [0.4] * 30 + [0.0] * 40
    events, _ = scripted(probs, threshold=0.5, release=0.35, silence_ms=300, min_speech_ms=100,
                         pre_roll_ms=0, post_roll_ms=0)
    (end,) = utterances(events)
    assert end.start == pytest.approx(10 * WINDOW / SPEECH_RATE)
    assert end.at == pytest.approx(60 * WINDOW / SPEECH_RATE)  # the 0.4 windows count as speech


def test_short_blips_are_dropped_and_silence_tolerance_bridges_pauses():
    probs = [0.9] * 3 + [0.0] * 40 + [0.9] * 20 + [0.0] * 5 + [0.9] * 20 + [0.0] * 40
    events, _ = scripted(probs, silence_ms=300, min_speech_ms=250, pre_roll_ms=0, post_roll_ms=0)
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert ends[0].dropped  # 96 ms blip
    (utt,) = utterances(events)  # 160 ms pause < 300 ms tolerance: one utterance
    assert utt.start == pytest.approx(43 * WINDOW / SPEECH_RATE)
    assert utt.at == pytest.approx(88 * WINDOW / SPEECH_RATE)


def test_a_pause_is_announced_once_and_so_is_the_speech_that_follows_it():
    """SpeechPause at speculate_ms of silence (the utterance so far, as its SpeechEnd would cut
    it), SpeechResume when speech comes back, and no announcement once the turn has ended."""
    from cloud.vad import SpeechPause, SpeechResume

    probs = [0.0] * 10 + [0.9] * 20 + [0.0] * 6 + [0.9] * 20 + [0.0] * 20
    events, audio = scripted(probs, silence_ms=400, speculate_ms=96, pre_roll_ms=0, post_roll_ms=64)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SpeechStart", "SpeechPause", "SpeechResume", "SpeechPause", "SpeechEnd"]
    first, second, end = events[1], events[3], events[4]
    assert first.at == pytest.approx(30 * WINDOW / SPEECH_RATE) and second.at == pytest.approx(56 * WINDOW / SPEECH_RATE)
    assert first.start == second.start == end.start
    assert np.array_equal(second.audio.samples, end.audio.samples)  # the turn started there hears the same
    assert np.array_equal(first.audio.samples, audio.samples[10 * WINDOW : 30 * WINDOW + 64 * 16])
    off, _ = scripted(probs, silence_ms=400, speculate_ms=0, pre_roll_ms=0, post_roll_ms=64)
    assert not [e for e in off if isinstance(e, (SpeechPause, SpeechResume))]


def test_pre_and_post_roll_come_from_the_stream():
    probs = [0.0] * 30 + [0.9] * 20 + [0.0] * 40
    events, audio = scripted(probs, silence_ms=400, pre_roll_ms=192, post_roll_ms=128)
    (utt,) = utterances(events)
    lo, hi = (30 * WINDOW - 192 * 16), (50 * WINDOW + 128 * 16)
    assert np.array_equal(utt.audio.samples, audio.samples[lo:hi])


def test_longer_than_maximum_is_flushed_without_losing_audio():
    probs = [0.9] * 200 + [0.0] * 40  # 6.4 s of speech, maximum 2 s
    events, audio = scripted(probs, max_utterance_s=2.0, silence_ms=300, pre_roll_ms=0, post_roll_ms=0)
    utts = utterances(events)
    assert len(utts) == 4 and all(u.forced for u in utts[:3]) and not utts[-1].forced
    assert all(u.audio.seconds <= 2.0 + WINDOW / SPEECH_RATE for u in utts)
    joined = np.concatenate([u.audio.samples for u in utts])
    assert np.array_equal(joined, audio.samples[: 200 * WINDOW])  # contiguous, nothing lost or doubled
    starts = [e for e in events if isinstance(e, SpeechStart)]
    assert len(starts) == 4


def test_gated_audio_is_zero_outside_speech():
    probs = [0.0] * 10 + [0.9] * 20 + [0.0] * 30
    n = len(probs) * WINDOW
    seg = Segmenter(ScriptedVad(probs), VadConfig(silence_ms=200, pre_roll_ms=0, post_roll_ms=0))
    seg.feed(np.ones(n, np.float32))
    assert seg.gated[: 10 * WINDOW].max() == 0.0
    assert seg.gated[10 * WINDOW : 30 * WINDOW].min() == 1.0
    assert seg.gated[-10 * WINDOW :].max() == 0.0


def test_meter_ticks_steadily_whatever_the_chunks():
    meter = LevelMeter(800)
    ticks = []
    for size in (100, 1700, 3, 5000, 797):
        ticks += meter.feed(np.full(size, 0.5, np.float32))
    assert [end for end, _ in ticks] == [800 * i for i in range(1, 10)]
    assert all(lvl.peak_db == pytest.approx(-6.02, abs=0.01) for _, lvl in ticks)
    silent = measure(np.zeros(100, np.float32))
    assert silent.peak_db == silent.rms_db == FLOOR_DB
    sine = np.sin(np.linspace(0, 200 * np.pi, 16000)).astype(np.float32)
    assert measure(sine).rms_db == pytest.approx(-3.01, abs=0.05)


# --- end of turn: Smart Turn on real speech ----------------------------------------------------


@pytest.fixture(scope="module")
def smart_turn():
    from cloud.turn_end import SmartTurn
    from shared.models import resolve

    return SmartTurn(resolve("turn").path)


def test_a_person_who_pauses_mid_thought_is_not_cut_off(vad_model, smart_turn, speech60):
    """The lecturer says "And the answer that comes back is, ... well, I wouldn't start from
    here, sonny." with a pause after "is,": stretched to 0.8 s with the recording's own room
    tone, silence alone cuts the sentence in two; the turn-end model hears it is unfinished."""
    spoken = Audio.concat([speech60.slice(2.5, 4.75), speech60.slice(4.55, 4.85), speech60.slice(4.75, 7.0)])
    silence_only = utterances(run(Segmenter(vad_model, VadConfig()), spoken))
    assert len(silence_only) == 2  # the condition is real: a 500 ms wait answers mid-thought
    with_model = utterances(run(Segmenter(vad_model, VadConfig(), smart_turn), spoken))
    assert len(with_model) == 1 and with_model[0].audio.seconds > 4.0  # one utterance: the whole thought


def test_a_finished_question_ends_the_turn_after_a_short_pause(vad_model, smart_turn, speech60):
    """"Who's going to implement a 4% global wealth tax?" then silence: the model says done at
    the first ask (200 ms), where silence alone waits 500 ms."""
    asked = Audio.concat([Audio.silence(0.3), speech60.slice(50.8, 54.15), Audio.silence(1.5)])
    cfg = VadConfig()

    def pause(end: SpeechEnd) -> float:  # from the last speech window to the decision
        return end.decided - (end.at - cfg.post_roll_ms / 1000)

    (quick,) = utterances(run(Segmenter(vad_model, cfg, smart_turn), asked))
    (slow,) = utterances(run(Segmenter(vad_model, cfg), asked))
    assert quick.turn_p is not None and quick.turn_p >= cfg.turn_threshold
    assert pause(quick) < 0.25 and pause(slow) >= cfg.silence_ms / 1000
    assert quick.audio.seconds == pytest.approx(slow.audio.seconds, abs=0.05)  # the same words, sooner


def test_without_the_model_a_no_waits_for_the_longest_pause(vad_model, speech60):
    """A model that always says "not yet": the turn still ends, after turn_max_silence_ms."""
    cfg = VadConfig()
    asked = Audio.concat([speech60.slice(50.8, 54.15), Audio.silence(2.0)])
    calls = []

    def never(samples):
        calls.append(len(samples))
        return 0.0

    (end,) = utterances(run(Segmenter(vad_model, cfg, never), asked))
    assert len(calls) == 2  # asked at 200 ms and at 500 ms of this pause, not once a window
    assert end.decided - (end.at - cfg.post_roll_ms / 1000) == pytest.approx(cfg.turn_max_silence_ms / 1000, abs=0.04)


def test_an_utterance_end_says_how_much_silence_decided_it(vad_model, speech60):
    """What the turn decision costs a person: from the last speech window to the end being
    judged. On silence alone that is the silence rule (within a window); the event carries it."""
    from cloud.conversation import speech_ended

    cfg = VadConfig()
    audio = Audio.concat([Audio.silence(0.3), speech60.slice(0.0, 2.3), Audio.silence(1.5)])
    (end,) = utterances(run(Segmenter(vad_model, cfg), audio))
    waited = speech_ended(end, 0.0).waited
    assert abs(waited - cfg.silence_ms / 1000) <= 2 * WINDOW / SPEECH_RATE, waited
    assert end.voice_end < end.at <= end.voice_end + cfg.post_roll_ms / 1000 + 1e-6
