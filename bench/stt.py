"""Our SpeechToText.transcribe against bare faster-whisper with the same decoding options.

Same model directory, int8 on CPU, the options cloud/stt.py passes; runs interleaved
(ours, bare, ours, bare…) on the whole recording and on a short utterance cut from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from faster_whisper import WhisperModel

from _common import SPEECH, median, show, timed, verdict
from cloud.stt import SpeechToText
from shared.audio import Audio, decode
from shared.config import SttConfig
from shared.models import resolve


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
    args = ap.parse_args()

    model = resolve("stt")
    cfg = SttConfig(beam_size=args.beam_size)
    ours = SpeechToText(model, cfg)
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
        t_ours, t_bare = [], []
        for _ in range(args.repeat):
            t_ours.append(timed(lambda: ours.transcribe(clip)))
            t_bare.append(timed(lambda: bare_transcribe(bare, clip, cfg)))
        mo, mb = median(t_ours), median(t_bare)
        rows.append([name, f"{mo:.3f} s", f"{mb:.3f} s", verdict(mo / mb, 1.05),
                     f"{mo / clip.seconds:.3f}", text])
    show(
        f"STT: {model.name} ({ours.device}, {ours.compute_type}, beam {cfg.beam_size}), "
        f"median of {args.repeat}",
        ["clip", "ours", "bare", "ours/bare", "ours RTF", "text vs bare"],
        rows,
        caption="target: ours/bare ≤ 1.05x · RTF: seconds of compute per second of audio",
    )


if __name__ == "__main__":
    main()
