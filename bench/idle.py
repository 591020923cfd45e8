"""The cost of waiting: CPU moi keeps busy while it listens to a silent room.

`moi --input mic --output speaker --json --no-meters` (the defaults, models loaded) on the
PulseAudio virtual card of tests/pulse.py, whose microphone is digital silence: the process's
CPU time (user + system, all its threads, from /proc) over ``--seconds`` of listening, in
cores, for each barge-in mode, and (mode ``view``) the same in a terminal with its live view,
as a person starts it; beside it, Silero VAD alone on the same stream (the floor: every 32 ms
window must be looked at). Target: ≤ 0.03 cores in `auto`. Nothing else should run.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import console, end, show, thread_cpu, verdict  # noqa: E402
from tests import pulse  # noqa: E402

BIN = Path(sys.executable).parent
TARGET = 0.03
TICK = os.sysconf("SC_CLK_TCK")


# what each OS thread is (moi names its own: shared.engine.name_os_thread)
THREADS = {
    "moi-capture": "capture: the echo canceller, the VAD, Smart Turn",
    "moi-conversatio": "the conversation state machine",
    "moi-mic": "PortAudio's microphone callback",
    "moi-speaker": "PortAudio's speaker callback (silence every 20 ms)",
    "threaded-ml": "libpulse's client threads (the sound server's)",
    "moi": "the main thread: the terminal view's drawing (view mode)",
}


def _cpu(stat: str) -> float:
    """User + system CPU seconds in a /proc ``stat`` line."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` so far, all its threads (those ended too)."""
    return _cpu(Path(f"/proc/{pid}/stat").read_text())


def by_thread(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread name of process ``pid`` (threads of one name summed)."""
    out: dict[str, float] = {}
    for (name, _), seconds in thread_cpu(pid).items():
        out[name] = out.get(name, 0.0) + seconds
    return out


def _started(mode: str) -> subprocess.Popen:
    """``moi`` listening to the card's microphone, models loaded; its output read on a thread
    (a full pipe would stall it). ``view``: in a terminal (a pty, 120 × 40), with its live view."""
    cmd = [str(BIN / "moi"), "--local", "--input", "mic", "--output", "speaker"]
    if mode != "view":
        cmd += ["--json", "--no-meters", "--barge-in", mode]
        moi = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        for line in moi.stdout:  # models load first: wait for the first status (it is listening)
            if json.loads(line).get("type") == "status":
                break
        else:
            end(moi)
            raise SystemExit(f"moi --barge-in {mode} ended before it listened (exit {moi.returncode})")
        threading.Thread(target=lambda: [None for _ in moi.stdout], daemon=True).start()
        return moi
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    moi = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL)
    os.close(slave)
    drawn = threading.Event()

    def read() -> None:
        seen = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # moi ended
                break
            if not data:
                break
            if not drawn.is_set():
                seen = (seen + data)[-4096:]
                if b"before VAD" in seen:
                    drawn.set()
        os.close(master)

    threading.Thread(target=read, daemon=True).start()
    if not drawn.wait(120):
        end(moi)
        raise SystemExit("moi drew no view in 120 s")
    return moi


def listening(mode: str, seconds: float) -> tuple[float, dict[str, float]]:
    """Cores ``moi`` keeps busy over ``seconds`` of silence, once it is listening: in all, and
    per thread name."""
    moi = _started(mode)
    try:
        time.sleep(2.0)  # start-up's last work (the first windows, the stream settling) left out
        c0, per0, t0 = cpu_s(moi.pid), by_thread(moi.pid), time.monotonic()
        time.sleep(seconds)
        c1, per1, elapsed = cpu_s(moi.pid), by_thread(moi.pid), time.monotonic() - t0
        return (c1 - c0) / elapsed, {k: (v - per0.get(k, 0.0)) / elapsed for k, v in per1.items()}
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
    ap.add_argument("--modes", default="auto,half,full,view",
                    help="barge-in modes (quiet, --json); view: `moi` in a terminal with its live view (auto)")
    args = ap.parse_args()
    pulse.start()
    rows, split = [], {}
    with console.status("listening to silence…"):
        for mode in args.modes.split(","):
            cores, split[mode] = listening(mode, args.seconds)
            label = "moi in a terminal, its live view drawing" if mode == "view" else f"moi --barge-in {mode} --json"
            rows.append([label, verdict(cores, TARGET, " cores", 3) if mode in ("auto", "view") else f"{cores:.3f} cores"])
        rows.append(["Silero VAD alone, the same stream", f"{silero_alone(args.seconds):.3f} cores"])
    show(f"Idle listening: {args.seconds:.0f} s of a silent microphone, models loaded", ["", "CPU"], rows,
         caption=f"target: ≤ {TARGET} cores in auto and view · {os.cpu_count()} cores · PulseAudio virtual card")
    modes = list(split)
    names = sorted({k for m in modes for k, v in split[m].items() if v > 0}, key=lambda k: -max(split[m].get(k, 0) for m in modes))
    show("Where it goes: cores per thread", ["thread", *modes],
         [[f"{k} · {THREADS.get(k, 'other')}", *(f"{split[m].get(k, 0.0):.4f}" for m in modes)] for k in names],
         caption="from /proc, the same runs · unnamed threads carry the process's name (moi)")


if __name__ == "__main__":
    main()
