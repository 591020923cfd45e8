"""Our SpeechToText.transcribe against bare faster-whisper with the same decoding options.

Same model directory, int8 on CPU, the options cloud/stt.py passes; runs interleaved
(ours, ours on Whisper's full 30 s window, bare, …) on the whole recording and on a short
utterance cut from it.

Then what the shorter window costs in words: the word error rate of ``--spans`` random runs of
words cut from the real recordings (at word boundaries, 2-45 words, Whisper base's words as the
reference), transcribed with moi's window and with the full 30 s one, and how often a windowed
result was redone on 30 s (Whisper looping or hearing nothing).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import jiwer
import numpy as np

from faster_whisper import WhisperModel

from _common import AUDIO_DIR, SPEECH, median, show, timed, verdict
from cloud.stt import SpeechToText
from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import SttConfig
from shared.models import resolve
from shared.text import spoken_words


def bare_transcribe(model: WhisperModel, audio: Audio, cfg: SttConfig) -> str:
    """What SpeechToText.transcribe asks of faster-whisper, without its checks and filtering."""
    segments, _info = model.transcribe(
        audio.samples,
        language=cfg.language,  # None: detected (multilingual) or English (.en models)
        beam_size=cfg.beam_size,
        initial_prompt=cfg.initial_prompt,
        word_timestamps=cfg.word_timestamps,
        condition_on_previous_text=False,
        no_speech_threshold=cfg.no_speech_threshold,
        log_prob_threshold=cfg.logprob_threshold,
        compression_ratio_threshold=cfg.compression_ratio_threshold,
        vad_filter=False,
    )
    return " ".join(s.text.strip() for s in segments).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each per clip (median reported)")
    ap.add_argument("--beam-size", type=int, default=SttConfig.beam_size)
    ap.add_argument("--short", type=float, nargs=2, default=(0.0, 3.0), metavar=("START", "END"),
                    help="seconds of the recording used as the short utterance")
    ap.add_argument("--audio", type=Path, default=SPEECH)
    ap.add_argument("--spans", type=int, default=120, help="random spans of real speech for the window's WER (0: skip)")
    args = ap.parse_args()

    model = resolve("stt")
    cfg = SttConfig(beam_size=args.beam_size)
    ours = SpeechToText(model, cfg)
    full = SpeechToText(model, replace(cfg, window_s=0))
    bare = WhisperModel(str(model.path), device="cpu", compute_type="int8")
    audio = decode(args.audio)
    short = audio.slice(*args.short)
    clips = {f"{audio.seconds:.0f} s recording": audio, f"{short.seconds:g} s utterance": short}

    rows = []
    for name, clip in clips.items():
        heard = ours.transcribe(clip)  # also the warm-up
        if heard.text == bare_transcribe(bare, clip, cfg):
            text = "same"
        else:  # ours drops Whisper's hallucinations ("Thank you." on trailing silence)
            text = f"ours dropped {heard.dropped} segment(s)" if heard.dropped else "[yellow]differs[/]"
        full.transcribe(clip)
        t_ours, t_full, t_bare = [], [], []
        for _ in range(args.repeat):
            t_ours.append(timed(lambda: ours.transcribe(clip)))
            t_full.append(timed(lambda: full.transcribe(clip)))
            t_bare.append(timed(lambda: bare_transcribe(bare, clip, cfg)))
        mo, mf, mb = median(t_ours), median(t_full), median(t_bare)
        frames = ours.window_frames(clip.seconds)
        rows.append([name, f"{(frames or 3000) / 100:g} s", f"{mo:.3f} s", f"{mf:.3f} s", f"{mb:.3f} s",
                     verdict(mo / mb, 1.05), f"{mo / clip.seconds:.3f}", text])
    show(
        f"STT: {model.name} ({ours.device}, {ours.compute_type}, beam {cfg.beam_size}), "
        f"median of {args.repeat}",
        ["clip", "window", "ours", "ours, 30 s", "bare", "ours/bare", "ours RTF", "text vs bare"],
        rows,
        caption="target: ours/bare ≤ 1.05x · RTF: seconds of compute per second of audio",
    )
    if args.spans:
        window_words(ours, full, args.spans)


def window_words(ours: SpeechToText, full: SpeechToText, n: int) -> None:
    """The shorter window's word error rate against the full one's, on random spans of speech."""
    base = WhisperModel(str(resolve("stt", "base").path), device="cpu", compute_type="int8")
    spans = []
    files = [SPEECH, AUDIO_DIR / "two_speakers_stereo_5s.wav", AUDIO_DIR / "comfyui_hotword.mp3"]
    for k, path in enumerate(files):
        audio = decode(path).resample(SPEECH_RATE)
        segments, _ = base.transcribe(audio.samples, language="en", beam_size=5, word_timestamps=True)
        words = [w for seg in segments for w in seg.words]
        rng = random.Random(k)
        for _ in range(n * 5 // 6 if k == 0 else n // 12):  # most from the minute-long lecture
            m = rng.randint(2, min(45, len(words) - 1))
            i = rng.randrange(0, len(words) - m + 1)
            clip = audio.slice(max(0.0, words[i].start - 0.05), words[i + m - 1].end + 0.1)
            # the VAD's pre- and post-roll around an utterance
            pad = np.concatenate([np.zeros(SPEECH_RATE * 3 // 10, np.float32), clip.samples,
                                  np.zeros(SPEECH_RATE // 5, np.float32)])
            spans.append(("".join(w.word for w in words[i : i + m]), Audio(pad, SPEECH_RATE)))
    refs = [_norm(text) for text, _ in spans]
    retries = ours.full_window_retries
    heard = {name: [_norm(stt.transcribe(a).text) or "-" for _, a in spans] for name, stt in (("window", ours), ("30 s", full))}
    changed = sum(a != b for a, b in zip(*heard.values()))
    rows = [["moi's window", f"{jiwer.wer(refs, heard['window']):.3f}", f"{changed} of {len(spans)}",
             f"{ours.full_window_retries - retries} of {len(spans)}"],
            ["30 s", f"{jiwer.wer(refs, heard['30 s']):.3f}", "", ""]]
    show(f"STT window: word error rate on {len(spans)} spans of real speech (Whisper base's words as reference)",
         ["window", "WER", "words differ from 30 s", "redone on 30 s"], rows,
         caption="target: moi's window no worse than 30 s")


def _norm(text: str) -> str:
    return " ".join(spoken_words(text))


if __name__ == "__main__":
    main()
