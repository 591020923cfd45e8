"""End of speech → first reply audio, per stage, with the default (offline) models.

The chat pipeline is built as `moi` builds it; the utterances are the ones our Segmenter cuts
from a real recording, each run through ``Pipeline.turn`` in one running conversation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import SPEECH, console, median, show, verdict
from cloud.pipeline import Pipeline, file_source
from local.run import build
from local.view import TIMING_LABELS
from cloud.vad import SpeechEnd
from shared.audio import Audio
from shared.config import Config
from shared.events import ErrorEvent, Transcript, TurnDone
from shared.messages import Thread

STAGES = ("stt", "llm_first_token", "llm_first_piece", "tts_first", "first_audio", "llm", "tts", "total")
LABELS = TIMING_LABELS | {"llm_first_piece": "llm until first piece (derived)", "tts": "tts"}
TARGET_S = 1.0


def utterances(pipeline: Pipeline, path: Path) -> list[Audio]:
    """What the pipeline's own Segmenter cuts from ``path`` fed in 0.1 s chunks."""
    seg = pipeline.segmenter
    seg.reset()
    events = [ev for chunk in file_source(path) for ev in seg.feed(chunk)] + seg.flush()
    return [ev.audio for ev in events if isinstance(ev, SpeechEnd) and ev.audio is not None]


def run_turn(pipeline: Pipeline, utterance: Audio) -> tuple[str, dict[str, float]]:
    heard, timings = "", {}
    for ev in pipeline.turn(utterance):
        if isinstance(ev, Transcript):
            heard = ev.text
        elif isinstance(ev, TurnDone):
            timings = ev.timings
        elif isinstance(ev, ErrorEvent):
            raise SystemExit(f"turn failed: {ev.message}")
    return heard, timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utterances", type=int, default=6, help="at most this many (≥ 5 for the figure)")
    ap.add_argument("--beam-size", type=int, help="Whisper beam size (default: SttConfig's)")
    ap.add_argument("--max-tokens", type=int, help="reply length cap (default: LlmConfig's)")
    ap.add_argument("--audio", type=Path, default=SPEECH)
    args = ap.parse_args()

    cfg = Config.load(stt__beam_size=args.beam_size, llm__max_tokens=args.max_tokens)
    with console.status("loading models…"):
        pipeline = build(cfg, "chat")
    clips = utterances(pipeline, args.audio)[: args.utterances]
    if not clips:
        raise SystemExit(f"no speech found in {args.audio}")
    with console.status("warming up…"):
        run_turn(pipeline, clips[0])
    pipeline.thread = Thread(cfg.llm.system_prompt, cfg.llm.max_turns)  # forget the warm-up turn

    turns = []
    for i, clip in enumerate(clips, 1):
        with console.status(f"turn {i}/{len(clips)}…"):
            heard, timings = run_turn(pipeline, clip)
        if {"stt", "tts_first", "first_audio"} <= timings.keys():
            timings["llm_first_piece"] = timings["first_audio"] - timings["stt"] - timings["tts_first"]
        turns.append(timings)
        first = timings.get("first_audio", float("nan"))
        console.print(f"[dim]{i}. {clip.seconds:4.1f} s said, first audio {first:.2f} s: {heard[:40]}[/]")

    rows = []
    for stage in STAGES:
        values = [t[stage] for t in turns if stage in t]
        if values:
            rows.append([LABELS.get(stage, stage), f"{median(values):.3f}", f"{min(values):.3f}",
                         f"{max(values):.3f}", len(values)])
    first = median([t["first_audio"] for t in turns if "first_audio" in t])
    show(
        f"Latency per stage (s) over {len(turns)} utterances: beam {cfg.stt.beam_size}, "
        f"max {cfg.llm.max_tokens} tokens",
        ["stage", "median", "min", "max", "turns"],
        rows,
        caption=f"median end of speech → first audio {verdict(first, TARGET_S, ' s')} "
        f"(target ≤ {TARGET_S:g} s)",
    )


if __name__ == "__main__":
    main()
