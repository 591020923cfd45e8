import numpy as np
import pytest

from cloud.stt import SpeechToText
from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import SttConfig
from shared.models import resolve
from tests.conftest import audio_file, noise, words


def test_gets_the_words_of_real_speech(stt, speech60):
    result = stt.transcribe(speech60.slice(0, 19))
    heard = words(result.text)
    assert {"dublin", "answer", "start", "here", "political", "philosophy"} <= heard
    assert result.language == "en"
    assert result.segments and result.dropped == 0
    ends = [s.end for s in result.segments]
    assert ends == sorted(ends) and ends[-1] <= 19.0


def test_word_timestamps_lie_inside_the_audio(stt, speech60):
    clip = speech60.slice(0, 7)
    result = stt.transcribe(clip, word_timestamps=True)
    ws = [w for s in result.segments for w in s.words]
    assert len(ws) >= 10
    assert all(0 <= w.start <= w.end <= clip.seconds + 0.05 for w in ws)
    assert [w.start for w in ws] == sorted(w.start for w in ws)
    assert any("dublin" in w.word.lower() for w in ws)


@pytest.mark.parametrize("span", [(0.0, 1.0), (1.0, 3.0), (10.6, 12.0), (12.0, 13.0), (21.2, 24.5)])
def test_nothing_from_hum_clicks_and_silence(stt, clatter, span):
    assert stt.transcribe(clatter.slice(*span)).text == ""


def test_nothing_from_generated_noise(stt, rng):
    for level in (0.01, 0.1, 0.4):
        assert stt.transcribe(noise(rng, 3.0, level)).text == ""
    assert stt.transcribe(Audio.silence(2.0)).text == ""
    assert stt.transcribe(Audio(np.zeros(10, np.float32), SPEECH_RATE)).text == ""


def test_other_rates_are_resampled(stt, speech60):
    clip = speech60.slice(0, 7).resample(8000)
    assert {"dublin", "answer"} <= words(stt.transcribe(clip).text)


def test_prompt_fixes_a_product_name(stt):
    audio = decode(audio_file("comfyui_hotword.mp3"))
    plain = stt.transcribe(audio).text
    hinted = stt.transcribe(audio, prompt="ComfyUI").text
    assert "folder" in words(plain)
    assert "comfyui" in hinted.lower()


def test_language_option_on_an_english_only_model_does_not_fail(stt, speech60):
    result = stt.transcribe(speech60.slice(0, 4), language="de")
    assert "dublin" in words(result.text)


@pytest.fixture(scope="module")
def stt_base():
    """Whisper base (multilingual), shipped in two PyPI parts (the dev extra installs them)."""
    return SpeechToText(resolve("stt", "base"), SttConfig())


def test_multilingual_model_detects_and_takes_a_language(stt_base, speech60):
    clip = speech60.slice(0, 7)
    auto = stt_base.transcribe(clip)
    assert auto.language == "en" and {"dublin", "answer"} <= words(auto.text)
    assert stt_base.transcribe(clip, language="de").language == "de"


def test_opus_non_english_clip_gives_nothing_rather_than_junk(stt, stt_base):
    """Whisper base scores this clip avg_logprob ~ -2.7 (junk such as "Огонение"); tiny.en
    cannot read it at all. Both must return nothing."""
    audio = decode(audio_file("speech_short.opus"))
    assert stt.transcribe(audio).text == ""
    result = stt_base.transcribe(audio, language="ru")
    assert result.text == "" and result.language == "ru"


def test_a_sentence_heard_over_moi_is_not_dropped_for_its_fallback_score(stt):
    """Run 28's quiet sentence as the VAD cut it over moi's echo (6 dB, after AEC3): Whisper
    falls back to temperature 1.0 on it and scores avg_logprob -1.05..-1.3, no_speech_prob
    0.10. A filter on the log-probability alone dropped it every time (the transcript came back
    empty); now each decoding keeps what Whisper made of it. What that is varies with the
    sample (fixed seeds do not fix it across a suite: once only "He"), so the words are not
    asserted, only that nothing is dropped."""
    import ctranslate2

    audio = decode(audio_file("speech_over_moi_f32.wav"))
    greedy, _ = stt.model.transcribe(audio.samples, beam_size=stt.cfg.beam_size, temperature=0.0)
    assert max(s.avg_logprob for s in greedy) < stt.cfg.logprob_threshold  # so Whisper samples
    for seed in range(3):
        ctranslate2.set_random_seed(seed)
        result = stt.transcribe(audio)
        assert result.text and result.dropped == 0, result


@pytest.mark.parametrize(
    ("text", "avg_logprob", "no_speech_prob", "junk"),
    [
        (" I see you.", -1.098, 0.301, True),  # made up from echo residue (run 8's replay)
        (" See you did it!", -1.226, 0.421, True),  # the same, run 28's
        (" Thank you.", -0.870, 0.846, True),  # the end of speech_60s: trailing breath
        (" He enjoys a few trains and desert who would vanish behind the curtain.", -1.15, 0.103, False),
    ],
)
def test_low_log_probability_is_junk_only_when_whisper_doubts_there_is_speech(
    stt, text, avg_logprob, no_speech_prob, junk
):
    from types import SimpleNamespace

    scores = {"avg_logprob": avg_logprob, "no_speech_prob": no_speech_prob, "compression_ratio": 1.0}
    segment = SimpleNamespace(text=text, start=0.0, end=1.0, **scores)
    assert stt._is_junk(segment, 2.0) is junk


@pytest.mark.parametrize("text", ["", " ", ".", "...", " ♪ ", "?!"])
def test_a_segment_without_words_is_no_transcript(stt, text):
    """Whisper gave '.' for hum on another machine: a segment with no letter or digit is junk,
    whatever its scores say (here they look like good speech)."""
    from types import SimpleNamespace

    segment = SimpleNamespace(text=text, start=0.0, end=1.0, avg_logprob=-0.2, no_speech_prob=0.01, compression_ratio=1.0)
    assert stt._is_junk(segment, 2.0)
    assert not stt._is_junk(SimpleNamespace(**{**vars(segment), "text": " Hi."}), 2.0)
