"""The live path on a real PortAudio stack: speech onset → VAD event, and barge-in reaction.

Needs a sound server with a virtual microphone and speaker; this starts the PulseAudio
null-sink pair the tests use (tests/pulse.py). In process, each trial has moi answer a long
utterance (the echo pipeline says it back), then plays speech into the virtual mic (0.5 s of
silence, then speech) while that reply is playing, in full barge-in mode:

- onset → speech_start: from the speech onset in the injected sound to the VAD event (the
  whole mic path: sound server, PortAudio callback, queue, resampling, Silero);
- onset → playback stopped, as moi sees it: the player's own stop time.

The onset is taken as the moment just before `paplay` starts plus the 0.5 s lead. paplay's
start-up makes that late (figures look slower), while a null sink may hand audio to its monitor
a little ahead of the wall clock (figures look faster): read them as the latency of our path
from the sound server on, not of a physical microphone, which adds its own buffer.

Then the barge-in as a person hears it (target ≤ 200 ms): `moi --barge-in full` (a headset:
the microphone does not hear the speaker) on bench/voice_to_voice.py's card, where what is
played into the microphone and what moi plays land in one recording; real questions, each
reply talked over 1 s in, and from the recording: the person's first sample → the speaker
silent (bench/echo.py's trials and measure, without the room's echo).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import SPEECH, console, median, show, verdict  # noqa: E402
from local.audio_io import MicSource, Player  # noqa: E402
from cloud.engine import LocalEngine  # noqa: E402
from cloud.live import LiveSession  # noqa: E402
from cloud.pipeline import Pipeline  # noqa: E402
from cloud.vad import Segmenter, SileroVad  # noqa: E402
from shared.audio import Audio, decode  # noqa: E402
from shared.config import Config  # noqa: E402
from shared.events import ReplyStopped, SpeechStarted  # noqa: E402
from shared.models import resolve  # noqa: E402
from tests import pulse  # noqa: E402

LEAD_S = 0.5


def trial(live: LiveSession, player: Player, long_line: Path, question: Path) -> tuple[float, float] | None:
    while not live.events.empty():
        live.events.get_nowait()
    pulse.play(long_line).wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not player.playing:  # moi's reply to it has begun
        time.sleep(0.02)
    time.sleep(0.3)
    injected = time.monotonic()
    pulse.play(question)
    onset = injected + LEAD_S
    seen = stopped = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (seen is None or stopped is None):
        try:
            ev = live.events.get(timeout=0.05)
        except Exception:  # queue.Empty
            continue
        if isinstance(ev, SpeechStarted) and seen is None:
            seen = time.monotonic()
        elif isinstance(ev, ReplyStopped):
            stopped = player.stopped_at
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (live.answering or player.playing):  # the question's own answer
        time.sleep(0.1)
    player.stop()
    time.sleep(1.0)
    if seen is None or stopped is None:
        return None
    return seen - onset, stopped - onset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--no-recording", action="store_true", help="skip the barge-in measured on the recording")
    args = ap.parse_args()

    pulse.start()
    cfg = Config.load()
    speech = decode(SPEECH)
    tmp = Path(tempfile.mkdtemp())
    question = tmp / "question.wav"
    Audio.concat([Audio.silence(LEAD_S), speech.slice(0.0, 2.3), Audio.silence(0.5)]).save_wav(question)
    long_line = tmp / "long.wav"  # something long for moi to be saying back
    Audio.concat([Audio.silence(0.3), speech.slice(2.4, 7.1), Audio.silence(1.2)]).save_wav(long_line)

    pipeline = Pipeline(LocalEngine(cfg), Segmenter(SileroVad(resolve("vad").path), cfg.vad), cfg, "echo")
    player = Player()
    live = LiveSession(pipeline, MicSource().start(), player, barge_in="full").start()
    results = []
    try:
        time.sleep(1.0)
        for i in range(args.trials):
            got = trial(live, player, long_line, question)
            console.print(f"trial {i + 1}: " + ("missed" if got is None else f"vad {got[0] * 1000:.0f} ms, stop {got[1] * 1000:.0f} ms"))
            if got is not None:
                results.append(got)
    finally:
        live.close()
        player.close()
    if not results:
        console.print("[red]no trial completed[/]")
        raise SystemExit(1)
    vad = [r[0] for r in results]
    stop = [r[1] for r in results]
    rows = [
        ["speech onset → speech_start (mic path + VAD)", f"{median(vad) * 1000:.0f} ms", f"{min(vad) * 1000:.0f} ms", f"{max(vad) * 1000:.0f} ms"],
        ["speech onset → playback stopped, as moi sees it", f"{median(stop) * 1000:.0f} ms", f"{min(stop) * 1000:.0f} ms", f"{max(stop) * 1000:.0f} ms"],
    ]
    if not args.no_recording:
        heard = on_the_recording(args.trials)
        rows.append([f"first sample → speaker silent, on the recording ({heard['detected']}/{heard['trials']} heard)",
                     verdict(heard["silence"] * 1000, 200, " ms"), "", f"{heard['worst'] * 1000:.0f} ms"])
    show(
        f"Live path over {len(results)}/{args.trials} trials (PulseAudio null sinks, full barge-in)",
        ["", "median", "min", "max"], rows,
        caption="target: barge-in ≤ 200 ms as a person hears it · onset = paplay start + 0.5 s lead (see the docstring)",
    )


def on_the_recording(trials: int) -> dict:
    """`moi --barge-in full` talked over ``trials`` times, timed on the recording of both ends."""
    from echo import live as talk_over
    from voice_to_voice import questions

    clips = questions(2 * trials + 1)
    clips = [clips[i % len(clips)] for i in range(2 * trials + 1)]
    with tempfile.TemporaryDirectory() as tmp, console.status("barge-in on the recording…") as status:
        return talk_over("off", clips, trials, Path(tmp), status, barge_in="full", room=False)


if __name__ == "__main__":
    main()
