"""Live echo runs replayed: the same recorded signals through other barge-in settings, side by side.

Live runs of `bench/echo.py` vary more from run to run (what AEC3 makes of the same sentences)
than a setting changes, so two settings are compared on identical signals instead. `bench/echo.py
--keep DIR` has moi keep what its echo canceller was given and gave back (`MOI_ECHO_RECORD`:
microphone, reference and canceller output, chunk by chunk, see `local.echo.Recording`); this
script feeds each recording through a fresh `EchoCanceller` (its canceller's output and the
reference replaced by the recorded ones, so everything after AEC3 runs as it did live: the VAD,
`EchoPath`, `LinearEcho`, `TalkOver.person`) once per setting, and reports:

- when a stop is decided, for each sentence said over moi: the first chunk in which the VAD is
  in an utterance, moi's voice plays and `TalkOver.person` says a person (one stop an utterance). Counted from the sentence's
  first sound as played (`speech_onset` after paplay started it), to the chunk's capture time:
  the sound server's delay is in every figure alike, so compare the columns, not the target;
- stops decided where no person spoke (moi's own voice): target 0. Since live run 34 such a
  decision pauses the reply, and the conversation (`cloud.conversation`) stops it only once the person talks on for
  `CONFIRM_S` or Whisper finds words in what they said; the replay counts the decision, not
  what Whisper then makes of it;
- the same for the first pause or stop (``TalkOver.someone`` pauses a reply as soon as it
  is sure someone is there, before the VAD hears them), and pauses where nobody spoke.

A setting is ``KEY=VALUE,...``: a field of the VAD's config (``over_reply_threshold=0.5``) or a
constant of ``local.echo`` (``PERSON_SHARE=0.3``). ``-`` is the build as it is.

    python bench/echo_replay.py /tmp/run1 /tmp/run2 --settings - over_reply_threshold=0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import console, show  # noqa: E402
from echo import speech_onset  # noqa: E402
from voice_to_voice import questions  # noqa: E402
from shared.audio import SPEECH_RATE as R, Audio  # noqa: E402


def replay(folder: Path, setting: dict[str, str], clips: dict[str, Audio]) -> tuple[list[float | None], list[float]]:
    """One recorded run through one setting: per sentence said over moi, seconds from its first
    sound to the decision to stop (None: never), and the times stops were decided for nobody."""
    from cloud.vad import Segmenter, SileroVad
    from local import echo
    from cloud.pipeline import Pipeline
    from shared.config import Config
    from shared.models import resolve

    signals = next(folder.glob("*.signals"), None)
    events = next(folder.glob("*.events.json"), None)
    if signals is None or events is None:
        raise SystemExit(f"{folder}: no recording (run bench/echo.py --keep {folder} first)")
    mic, far, out = (np.fromfile(signals / f"{k}.f32", np.float32) for k in ("mic", "far", "out"))
    chunks = [json.loads(line) for line in (signals / "chunks.jsonl").read_text().splitlines()]
    run = json.loads(events.read_text())
    people = [(t, clips[text]) for t, text in run["people"]]

    vad_fields = {f.name for f in dataclasses.fields(Config().vad)}
    vad_cfg, saved = Config().vad, {}
    for key, value in setting.items():
        if key in vad_fields:
            vad_cfg = dataclasses.replace(vad_cfg, **{key: type(getattr(vad_cfg, key))(value)})
        elif hasattr(echo, key) and key.isupper():
            saved[key] = getattr(echo, key)
            setattr(echo, key, type(saved[key])(value))
        else:
            raise SystemExit(f"unknown setting {key!r}: a VadConfig field or a local.echo constant")

    class Replayed(echo.EchoCanceller):  # AEC3's output and the reference as they were live
        at = 0

        def reference(self, start: float, n: int) -> np.ndarray:
            return far[self.at : self.at + n]

    class Recorded:  # the microphone as it was, with each chunk's capture time
        captured_at = 0.0

        def __iter__(self):
            nonlocal stopped, paused_for
            at = 0
            for chunk in chunks:
                n = chunk["n"]
                aec.at, self.captured_at = at, chunk["captured_at"]
                yield Audio(mic[at : at + n], R)
                # the pipeline has taken the chunk in: the decision the conversation makes on it
                speaking = pipe.segmenter.speaking
                stopped = stopped and speaking  # one stop an utterance
                if speaking and not stopped and aec.playing and aec.talk.person():
                    decided.append(chunk["captured_at"])
                    stopped = True
                someone = aec.talk.someone()
                if someone and not paused_for:  # the conversation pauses the reply (one pause an episode)
                    paused.append(chunk["captured_at"])
                paused_for = someone
                at += n

    try:
        aec = Replayed(echo.FarEnd(R), "pywebrtc")
        aec._cancel = lambda near, _far, bypass=False: out[aec.at : aec.at + len(near)]  # as recorded
        cfg = dataclasses.replace(Config(), vad=dataclasses.replace(vad_cfg, turn_model="off", speculate_ms=0))
        pipe = Pipeline(None, Segmenter(SileroVad(resolve("vad").path), cfg.vad), cfg, "transcribe")
        decided, stopped, paused, paused_for = [], False, [], False
        # the VAD's threshold over moi's voice, as live (Listener)
        for _ in pipe.listen(Recorded(), echo=aec):
            pass
    finally:
        for key, value in saved.items():
            setattr(echo, key, value)
    over = people[2::2]  # bench/echo.py: a warm-up question, then a question and a sentence over its reply
    delays, silenced = [], []
    for t, clip in over:
        first = [u for u in decided if t <= u <= t + clip.seconds]
        delays.append(first[0] - (t + speech_onset(clip)) if first else None)
        first = sorted(u for u in decided + paused if t <= u <= t + clip.seconds)
        silenced.append(first[0] - (t + speech_onset(clip)) if first else None)
    spans = [(t - 0.2, t + clip.seconds + 0.5) for t, clip in people]
    own = [u - run["rec_started"] for u in decided if not any(a <= u <= b for a, b in spans)]
    own_pauses = [u - run["rec_started"] for u in paused if not any(a <= u <= b for a, b in spans)]
    return delays, own, silenced, own_pauses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders bench/echo.py --keep wrote")
    parser.add_argument("--settings", nargs="+", default=["-", "over_reply_threshold=0.5"])
    args = parser.parse_args()
    clips = dict(questions(21))
    rows = []
    for spec in args.settings:
        setting = dict(kv.split("=", 1) for kv in spec.split(",")) if spec != "-" else {}
        delays, own, silenced, own_pauses = [], [], [], []
        with console.status(f"replaying {spec}…"):
            for folder in args.runs:
                d, o, s, p = replay(folder, setting, clips)
                delays, silenced = delays + d, silenced + s
                own += [f"{folder.name} {t:.1f} s" for t in o]
                own_pauses += [f"{folder.name} {t:.1f} s" for t in p]
        heard = [d for d in delays if d is not None]
        quiet = [d for d in silenced if d is not None]
        rows.append([spec, f"{len(heard)}/{len(delays)}", f"{statistics.median(heard):.3f} s" if heard else "-",
                     f"{max(heard):.3f} s" if heard else "-", len(own), ", ".join(own[:4]),
                     f"{statistics.median(quiet):.3f} s" if quiet else "-", f"{max(quiet):.3f} s" if quiet else "-",
                     len(own_pauses), ", ".join(own_pauses[:4])])
        console.print(f"{spec}: " + " ".join("-" if d is None else f"{d:.2f}" for d in delays))
        console.print(f"{spec}, paused or stopped: " + " ".join("-" if d is None else f"{d:.2f}" for d in silenced))
    show(f"The same recorded signals ({len(args.runs)} runs) through each setting", [
        "setting", "stops decided", "first sound → decided, median", "worst", "stops for nobody (target 0)", "where",
        "→ paused or stopped, median", "worst", "pauses for nobody", "where"],
        rows)


if __name__ == "__main__":
    main()
