"""Peak memory (RSS) with all four models loaded and a full chat turn run.

The loading and the turn happen in a child process (this script with ``--child``), which
reports its RSS after each step; the parent reads the child's peak RSS from the kernel.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from _common import SPEECH, show, verdict

TARGET_GIB = 1.5
GIB, MIB = 1024**3, 1024**2


def child(audio: Path, turns: int) -> None:
    """Load the models one by one, run ``turns`` chat turns; one JSON line per step."""
    import psutil

    from cloud.engine import LocalEngine
    from cloud.pipeline import Pipeline, file_source
    from cloud.vad import Segmenter, SileroVad, SpeechEnd
    from shared.config import Config
    from shared.models import resolve

    proc = psutil.Process()

    def report(step: str) -> None:
        print(json.dumps({"step": step, "rss": proc.memory_info().rss}), flush=True)

    report("imports")
    cfg = Config.load()
    vad = SileroVad(resolve("vad", cfg.vad.model).path)
    report("+ VAD (Silero)")
    engine = LocalEngine(cfg)
    for role in ("stt", "llm", "tts"):
        engine.warm((role,))
        report(f"+ {role.upper()} ({engine.runners.model(role).name})")
    pipeline = Pipeline(engine, Segmenter(vad, cfg.vad), cfg, "chat")
    events = [ev for chunk in file_source(audio) for ev in pipeline.segmenter.feed(chunk)]
    clips = [ev.audio for ev in events + pipeline.segmenter.flush() if isinstance(ev, SpeechEnd) and ev.audio]
    for clip in clips[:turns]:
        for _ in pipeline.turn(clip):
            pass
    report(f"+ {min(turns, len(clips))} chat turn(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=1, help="chat turns run after loading")
    ap.add_argument("--audio", type=Path, default=SPEECH)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.audio, args.turns)

    cmd = [sys.executable, __file__, "--child", "--turns", str(args.turns), "--audio", str(args.audio)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the child failed:\n{out.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    rows, last = [], 0
    for line in out.stdout.splitlines():
        step = json.loads(line)
        rows.append([step["step"], f"{step['rss'] / GIB:.3f}", f"{(step['rss'] - last) / MIB:+.0f}"])
        last = step["rss"]
    rows.append(["[bold]peak (whole run)[/]", f"[bold]{peak / GIB:.3f}[/]", ""])
    show(
        "Memory: RSS of one process with all four models",
        ["after", "RSS (GiB)", "Δ (MiB)"],
        rows,
        caption=f"peak RSS {verdict(peak / GIB, TARGET_GIB, ' GiB')} (target ≤ {TARGET_GIB:g} GiB)",
    )


if __name__ == "__main__":
    main()
