"""The cost of waiting: CPU moi keeps busy while it listens to a silent room.

`moi --input mic --output speaker --json --no-meters` (the defaults, models loaded) on the
PulseAudio virtual card of tests/pulse.py, whose microphone is digital silence: the process's
CPU time (user + system, all its threads, from /proc) over ``--seconds`` of listening, in
cores, for each barge-in mode; beside it, Silero VAD alone on the same stream (the floor: every
32 ms window must be looked at). Target: ≤ 0.03 cores in `auto`. Nothing else should run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import console, end, show, verdict  # noqa: E402
from tests import pulse  # noqa: E402

BIN = Path(sys.executable).parent
TARGET = 0.03
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def listening(mode: str, seconds: float) -> float:
    """Cores ``moi`` keeps busy over ``seconds`` of silence, once it is listening."""
    cmd = [str(BIN / "moi"), "--local", "--input", "mic", "--output", "speaker", "--json", "--no-meters",
           "--barge-in", mode]
    moi = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    try:
        for line in moi.stdout:  # models load first: wait for the first status (it is listening)
            if json.loads(line).get("type") == "status":
                break
        time.sleep(2.0)  # start-up's last work (the first windows, the stream settling) left out
        # its events are read on (a full pipe would stall it)
        threading.Thread(target=lambda: [None for _ in moi.stdout], daemon=True).start()
        c0, t0 = cpu_s(moi.pid), time.monotonic()
        time.sleep(seconds)
        return (cpu_s(moi.pid) - c0) / (time.monotonic() - t0)
    finally:
        end(moi)


def silero_alone(seconds: float) -> float:
    """Silero on ``seconds`` of silence, window by window: its CPU seconds per second of audio."""
    import numpy as np

    from cloud.vad import CONTEXT, WINDOW, SileroVad
    from shared.models import resolve

    vad = SileroVad(resolve("vad").path)
    frame = np.zeros((1, CONTEXT + WINDOW), np.float32)
    n = int(seconds * 16000 / WINDOW)
    t = time.process_time()
    for _ in range(n):
        vad(frame)
    return (time.process_time() - t) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--modes", default="auto,half,full")
    args = ap.parse_args()
    pulse.start()
    rows = []
    with console.status("listening to silence…"):
        for mode in args.modes.split(","):
            cores = listening(mode, args.seconds)
            rows.append([f"moi --barge-in {mode}", verdict(cores, TARGET, " cores", 3) if mode == "auto" else f"{cores:.3f} cores"])
        rows.append(["Silero VAD alone, the same stream", f"{silero_alone(args.seconds):.3f} cores"])
    show(f"Idle listening: {args.seconds:.0f} s of a silent microphone, models loaded", ["", "CPU"], rows,
         caption=f"target: ≤ {TARGET} cores in auto · {os.cpu_count()} cores · PulseAudio virtual card")


if __name__ == "__main__":
    main()
