"""A virtual sound card for the live tests: PulseAudio with two null sinks.

`moi_mic`: tests play speech into it (paplay) and moi records its monitor as the default
source, a virtual microphone. `moi_speaker`: the default sink moi plays to; tests record its
monitor to check what moi said. sounddevice reaches it through ALSA's `default` device
(libasound2-plugins' pulse plugin).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

MIC, SPEAKER = "moi_mic", "moi_speaker"


def running() -> bool:
    return subprocess.run(["pactl", "info"], capture_output=True).returncode == 0


def start() -> None:
    if not shutil.which("pulseaudio"):
        raise RuntimeError("pulseaudio is not installed: `apt-get install pulseaudio pulseaudio-utils libasound2-plugins libportaudio2`")
    if not running():
        subprocess.run(
            ["pulseaudio", "-n", "--daemonize=yes", "--exit-idle-time=-1", "--log-target=stderr",
             "-L", "module-native-protocol-unix", "-L", "module-always-sink",
             "-L", f"module-null-sink sink_name={MIC} sink_properties=device.description={MIC}",
             "-L", f"module-null-sink sink_name={SPEAKER} sink_properties=device.description={SPEAKER}"],
            check=True, capture_output=True,
        )
        for _ in range(50):
            if running():
                break
            time.sleep(0.1)
    sinks = subprocess.run(["pactl", "list", "short", "sinks"], capture_output=True, text=True).stdout
    for name in (MIC, SPEAKER):
        if name not in sinks:
            subprocess.run(["pactl", "load-module", "module-null-sink", f"sink_name={name}"], check=True, capture_output=True)
    subprocess.run(["pactl", "set-default-sink", SPEAKER], check=True)
    subprocess.run(["pactl", "set-default-source", f"{MIC}.monitor"], check=True)


def stop() -> None:
    subprocess.run(["pulseaudio", "--kill"], capture_output=True)
    for _ in range(50):
        if not running():
            return
        time.sleep(0.1)


def play(path: str | Path) -> subprocess.Popen:
    """Speak into the virtual microphone."""
    return subprocess.Popen(["paplay", f"--device={MIC}", str(path)])


def record(path: str | Path) -> subprocess.Popen:
    """Record what moi plays on the virtual speaker (16 kHz mono s16le raw)."""
    return subprocess.Popen(
        ["parec", f"--device={SPEAKER}.monitor", "--rate=16000", "--channels=1", "--format=s16le", "--raw", str(path)]
    )


def echo_path(gain_db: float = -9.0, delay_ms: int = 50) -> int:
    """Make the virtual microphone hear the virtual speaker, as a laptop's does: a loopback
    from the speaker's monitor into the microphone sink, ``gain_db`` down and ``delay_ms``
    late. Returns the module id for :func:`remove_echo_path`."""
    out = subprocess.run(
        ["pactl", "load-module", "module-loopback", f"source={SPEAKER}.monitor", f"sink={MIC}",
         f"latency_msec={delay_ms}", "adjust_time=0", "source_dont_move=true", "sink_dont_move=true"],
        check=True, capture_output=True, text=True,
    ).stdout
    module = int(out.strip())
    # the loopback's sink input is the one this module owns (`pactl list short` shows its sink,
    # not its module: matching on that left the echo at 0 dB for sessions)
    inputs = subprocess.run(["pactl", "list", "sink-inputs"], capture_output=True, text=True).stdout
    owned = [block.split()[0].lstrip("#") for block in inputs.split("Sink Input ")[1:]
             if f"Owner Module: {module}\n" in block]
    if len(owned) != 1:
        remove_echo_path(module)
        raise RuntimeError(f"the echo path's loopback (module {module}) has {len(owned)} sink inputs, not one")
    subprocess.run(["pactl", "set-sink-input-volume", owned[0], f"{gain_db}dB"], check=True)
    return module


def remove_echo_path(module: int) -> None:
    subprocess.run(["pactl", "unload-module", str(module)], capture_output=True)
