"""Talking over moi on laptop speakers: the echo cancellers side by side, offline and live.

Offline (the same signals for each canceller): ten real Kokoro replies through a simulated
laptop echo path (30–80 ms late, 6–12 dB down, a short room tail), a fresh canceller for each.
Per canceller: echo removed once converged (ERLE), the turns moi's own voice would start (the
Silero segmenter on what is left: in the first 1.5 s of a reply, while the canceller learns,
and after), the word error rate of a person talking over moi (who stops 0.3 s later, as on a
barge-in) against the same speech alone, and the CPU the canceller costs per second of audio,
as a share of one core.

Live (`moi --input mic --output speaker --barge-in auto`, otherwise defaults): the virtual microphone
hears the virtual speaker through a PulseAudio loopback (9 dB down, `--echo-db`, 50 ms late). Each trial
plays a real question; while moi answers it, another real sentence is played over the reply,
1 s into it; that reply is cut, the sentence is answered, and that answer plays out untouched.
One recording bus holds both ends (bench/voice_to_voice.py's card), so "the person's first
sample → the speaker silent" is read from the recording: the sentence is found there and
subtracted, and what is left is moi; the first sample is the first sound of their speech
(``speech_onset``), not the room noise the clip starts with. A warm-up turn first lets the
canceller converge, as the first reply of a session does. Reported per canceller: self-interruptions (a turn or a cut
that no person caused; target 0), interruptions detected (the reply stopped, or paused and then
stopped or had nothing more to say, within 1.2 s of the sentence's end; target ≥ 9 of 10), median time to
silence (target ≤ 0.3 s), replies paused for a sound that proved to be nobody (they go on),
and the WER of the interrupting sentences as moi heard them over its
voice (every transcript of the sentence: a pause in it may end a turn) against the same
sentences alone (target within +0.05): transcribed whole, offline, and asked while moi was
silent in the same live run, through the same pipeline.

Runs outside CI (about 5 minutes a canceller live); nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import SPEECH, console, end, record_bus, show  # noqa: E402
from voice_to_voice import BIN, IN, REC, card, find, frames_db, questions  # noqa: E402
from shared.audio import SPEECH_RATE as R, Audio, decode  # noqa: E402
from tests import pulse  # noqa: E402
from tests.room import laptop_echo  # noqa: E402

REPLIES = [
    "Sure. The capital of France is Paris, a city on the Seine with about two million people.",
    "I can help with that. Start with a short list, then pick the one thing that matters most today.",
    "The weather tomorrow looks mild, with a little rain in the morning and sun after lunch.",
    "A good cup of tea needs water just off the boil and three to five minutes to steep.",
    "Dublin is on the east coast of Ireland. You can get there by ferry or by plane.",
    "That is a great question. Most people find that a walk after dinner helps them sleep.",
    "Here is a quick recipe: pasta, garlic, olive oil, a pinch of chili, and some parsley.",
    "The train leaves at a quarter past nine from platform four, and it takes two hours.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in the leaf.",
    "If you want to learn to code, pick one small project and build it from start to finish.",
]
PATHS = [(30, -6.0), (45, -9.0), (60, -12.0), (80, -9.0), (50, -6.0)]  # (delay ms, gain dB)
# a sentence's transcripts (one, or two when a pause cut it) come within this of its end, and
# before the next sentence is played: a turn may wait for a turn started at a pause and dropped
# (its Whisper pass cannot be cut short), measured live up to 3.7 s after the sentence's end
HEARD_S = 8.0
AUDIBLE_DB = -35.0  # moi's voice once the person is subtracted (what is left of them: -40..-60 dB)
ONSET_DB = -25.0  # a sentence starts at its first sound this close to its loudest
FLOOR_DB = 10.0  # ...and this far above the room it was recorded in
TARGETS = {"self": 0, "detected": 9, "silence_s": 0.3, "wer": 0.05}


def wer(reference: str, heard: str) -> float:
    import jiwer

    from shared.text import spoken_words

    ref = " ".join(spoken_words(reference))
    return jiwer.wer(ref, " ".join(spoken_words(heard)) or "<nothing>") if ref else 0.0


def without_prefix(text: str, prefix: str) -> str:
    """``text`` less its first words when they are ``prefix`` transcribed again (WER ≤ 0.5 over
    as many words): what a rejoined turn's transcript adds to the withdrawn one's."""
    words, n = text.split(), len(prefix.split())
    if n and len(words) > n and wer(prefix, " ".join(words[:n])) <= 0.5:
        return " ".join(words[n:])
    return text


def offline(names: list[str]) -> list[list[object]]:
    from cloud.stt import SpeechToText
    from cloud.tts import TextToSpeech
    from cloud.vad import Segmenter, SileroVad, SpeechStart
    from local import echo
    from shared.config import Config
    from shared.models import resolve

    tts, stt = TextToSpeech(resolve("tts")), SpeechToText(resolve("stt"))
    seg = Segmenter(SileroVad(resolve("vad").path), Config().vad)
    speech = decode(SPEECH)
    replies = [tts.synthesize(text).resample(R).samples for text in REPLIES]
    people = [speech.slice(5.0 * i, 5.0 * i + 4.0).samples for i in range(len(replies))]
    alone = [stt.transcribe(Audio(p, R)).text for p in people]

    def starts(x: np.ndarray) -> list[float]:
        seg.reset()
        return [e.at for e in seg.feed(x) + seg.flush() if isinstance(e, SpeechStart)]

    def run(name: str, mic: np.ndarray, far: np.ndarray) -> tuple[np.ndarray, float]:
        fc = echo.FrameCanceller(echo.backend(name))
        t = time.process_time()
        out = np.concatenate([fc(mic[i : i + 512], far[i : i + 512]) for i in range(0, len(mic), 512)])
        return out, time.process_time() - t

    rows = []
    for name in ["none", *names]:
        erles, early, late, wers, cpu, seconds = [], 0, 0, [], 0.0, 0.0
        for i, (reply, person) in enumerate(zip(replies, people)):
            delay, gain = PATHS[i % len(PATHS)]
            far = np.concatenate([np.zeros(R // 2, np.float32), reply, np.zeros(R, np.float32)])
            mic = laptop_echo(far, delay, gain, i)
            out, spent = (mic, 0.0) if name == "none" else run(name, mic, far)
            cpu, seconds = cpu + spent, seconds + len(mic) / R
            span = slice(int(2.5 * R), R // 2 + len(reply))
            erles.append(10 * np.log10(np.mean(mic[span] ** 2) / (np.mean(out[span] ** 2) + 1e-12)))
            s = starts(out)
            early += sum(t < 2.0 for t in s)
            late += sum(t >= 2.0 for t in s)
            # the person talks over the middle of the reply; moi stops 0.3 s later
            at = R // 2 + len(reply) // 2
            cut = np.concatenate([far, np.zeros(len(person), np.float32)])
            cut[at + int(0.3 * R) :] = 0
            mic2 = laptop_echo(cut, delay, gain, i)
            mic2[at : at + len(person)] += person
            out2, _ = (mic2, 0.0) if name == "none" else run(name, mic2, cut)
            wers.append(wer(alone[i], stt.transcribe(Audio(out2[at : at + len(person)], R)).text))
        rows.append([name, f"{statistics.median(erles):.1f} dB", early, late,
                     f"{statistics.mean(wers):.3f}", f"{100 * cpu / seconds:.2f} %" if name != "none" else "-"])
    return rows


def live(name: str, clips: list[tuple[str, Audio]], trials: int, tmp: Path, status=None,  # noqa: ANN001
         barge_in: str = "auto", room: bool = True, echo_db: float = -9.0, record: Path | None = None) -> dict:
    """One `moi --barge-in BARGE_IN` run with canceller ``name``: a warm-up turn, then ``trials``
    interrupted replies. ``room``: the microphone hears the speaker (a laptop), ``echo_db`` down;
    without it, a headset (bench/live.py measures `full` so). ``record``: a folder for the
    canceller's signals (MOI_ECHO_RECORD)."""
    card()
    loop = pulse.echo_path(gain_db=echo_db, delay_ms=50) if room else None
    env = {**os.environ, "MOI_ECHO_CANCELLER": name, "COLUMNS": "200"}
    if record is not None:  # what the canceller was given and gave back: bench/echo_replay.py
        env["MOI_ECHO_RECORD"] = str(record)
    cmd = [str(BIN / "moi"), "--local", "--input", "mic", "--output", "speaker", "--barge-in", barge_in, "--json",
           "--no-meters"]
    rec_path = tmp / f"{name}.raw"
    rec = record_bus(rec_path, f"{REC}.monitor")
    rec_started = time.monotonic()
    moi = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    events: queue.Queue[tuple[float, dict]] = queue.Queue()
    log: list[tuple[float, dict]] = []

    def read() -> None:
        for line in moi.stdout:
            try:
                events.put((time.monotonic(), json.loads(line)))
            except json.JSONDecodeError:
                pass

    def until(pred, timeout: float) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t, ev = events.get(timeout=0.1)
            except queue.Empty:
                if moi.poll() is not None:
                    raise SystemExit(f"moi ended: {moi.stderr.read()[-2000:]}")
                continue
            log.append((t, ev))
            if pred(ev):
                return True
        return False

    def play(clip: Audio) -> float:
        path = tmp / "clip.wav"
        clip.save_wav(path)
        t = time.monotonic()
        subprocess.Popen(["paplay", f"--device={IN}", str(path)])
        return t

    def quiet(pause: float) -> None:  # until moi has said nothing for ``pause`` s (its status says)
        last, deadline = time.monotonic(), time.monotonic() + 120
        while time.monotonic() < min(last + pause, deadline):
            if until(lambda ev: ev["type"] == "status" and ev["speaking"], 0.1):
                last = time.monotonic()

    threading.Thread(target=read, daemon=True).start()
    people: list[tuple[float, str, Audio]] = []  # (played at, text, clip) of everything we said
    try:
        until(lambda ev: ev["type"] == "status", 180)
        time.sleep(1.0)
        text, clip = clips[0]  # warm-up: one question answered and heard in full
        people.append((play(clip), text, clip))
        until(lambda ev: ev["type"] == "turn_done", 60)
        quiet(2.0)
        for i in range(trials):
            if status is not None:
                status.update(f"live: {name}, interrupted reply {i + 1} of {trials}…")
            q_text, q = clips[(2 * i + 1) % len(clips)]
            o_text, over = clips[(2 * i + 2) % len(clips)]
            people.append((play(q), q_text, q))
            until(lambda ev: ev["type"] == "reply_audio", 60)
            time.sleep(1.0)
            people.append((play(over), o_text, over))
            if until(lambda ev: ev["type"] == "transcript", over.seconds + 10):  # heard: wait for its answer
                until(lambda ev: ev["type"] == "turn_done", 60)
            quiet(2.0)
    finally:
        end(moi, rec)
        if loop is not None:
            pulse.remove_echo_path(loop)
    pcm = _read_bus(rec_path)
    (tmp / f"{name}.events.json").write_text(json.dumps(
        {"rec_started": rec_started, "people": [(t, text) for t, text, _ in people], "events": log}))
    return measure(name, log, people, pcm, rec_started)


def without(pcm: np.ndarray, at: int, clip: Audio, reach: int = 16) -> np.ndarray:
    """``pcm`` with ``clip`` (found at ``at``) taken out: the clip through the least-squares
    filter of ±``reach`` taps that the recording heard it through (the sound server resamples
    it on its way to the recording bus; a gain alone left it 17 dB down, louder than what is
    left of moi at the end of a cut reply)."""
    x, n = clip.samples, len(clip)
    shifted = np.zeros((n, 2 * reach + 1), np.float32)
    for j, lag in enumerate(range(-reach, reach + 1)):  # column j: the clip ``lag`` samples late
        shifted[max(lag, 0) : n + min(lag, 0), j] = x[max(-lag, 0) : n - max(lag, 0)]
    taps, *_ = np.linalg.lstsq(shifted, pcm[at : at + n], rcond=None)
    out = pcm.copy()
    out[at : at + n] -= shifted @ taps
    return out


def speech_onset(clip: Audio) -> float:
    """Where the person starts talking in ``clip`` (s): its first 10 ms within ONSET_DB of its
    loudest and FLOOR_DB above the room's own level (its quietest tenth). The clips are cut at
    Whisper's word times, which leave 0-0.38 s of the room before the first word (measured on
    the five used); a quiet first sound counts as the start, the room does not: one clip peaks
    at -20 dBFS, and ONSET_DB alone took its room (-44..-51 dB, 0.3 s of it) for speech."""
    db = frames_db(clip.samples)
    return float(np.argmax((db >= db.max() + ONSET_DB) & (db >= np.percentile(db, 10) + FLOOR_DB))) / 100


def measure(name: str, log, people, pcm: np.ndarray, rec_started: float) -> dict:  # noqa: ANN001
    starts = sorted(u for u, _, _ in people) + [float("inf")]

    def spans(after: float) -> dict[float, float]:  # each sentence played: until ``after`` s past its end, or the next
        return {u: min(u + clip.seconds + after, starts[starts.index(u) + 1]) for u, _, clip in people}

    # moi's reactions, each at what caused it: a stop, or a reply that ran out while paused, at the
    # pause it followed (a barge-in pauses at once; a short sentence is confirmed by Whisper only
    # after it ends, up to a second of turn-taking wait later), else where it happened
    reactions, paused = [], None
    for u, ev in log:
        if ev["type"] == "paused":
            paused = u if ev["paused"] else None
        elif ev["type"] == "stopped":
            reactions.append(paused if paused is not None else u)
            paused = None
        elif ev["type"] == "state" and ev["why"] == "reply over" and paused is not None:
            reactions.append(paused)  # paused for them, and nothing more came: over, not stopped
            paused = None

    heard_in, cut_in = spans(HEARD_S), spans(1.2)
    self_turns = sum(1 for t, ev in log if ev["type"] == "transcript" and not any(a <= t <= b for a, b in heard_in.items()))
    self_cuts = sum(1 for t in reactions if not any(a <= t <= b for a, b in cut_in.items()))
    went_on = sum(1 for t, ev in log if ev["type"] == "paused" and not ev["paused"])  # paused for nobody

    # A turn stopped as its reply began is withdrawn and answered again with what the person says
    # next (cloud.conversation.REJOIN_S): that transcript starts with the withdrawn one's words,
    # the question asked before the sentence, which are not the sentence's
    withdrawn, texts = set(), {}
    for _, ev in log:
        if ev["type"] == "withdrawn":
            withdrawn.add(ev["turn"])
        elif ev["type"] == "transcript":
            texts[ev["turn"]] = ev["text"]

    def own(ev: dict) -> str:
        before = texts.get(ev["turn"] - 1) if ev["turn"] - 1 in withdrawn else None
        return without_prefix(ev["text"], before) if before else ev["text"]

    def heard(t: float, clip: Audio) -> str:  # all moi transcribed of a sentence: a pause may cut it in two turns
        return " ".join(own(ev) for u, ev in log if ev["type"] == "transcript" and t <= u <= heard_in[t])

    detected, silences, wers = 0, [], []
    interruptions = people[2::2]
    # the same sentences asked while moi was silent, through the same live pipeline
    said_over = {text for _, text, _ in interruptions}
    alone = [wer(text, heard(t, clip)) for t, text, clip in [people[0], *people[1::2]] if text in said_over]
    for t, text, clip in interruptions:
        if not any(t <= u <= t + clip.seconds + 1.2 for u in reactions):
            continue
        detected += 1
        wers.append(wer(text, heard(t, clip)))
        near = int((t - rec_started) * R)
        at = find(clip, pcm, near, R)
        moi_only = without(pcm, at, clip)  # what is left is moi's voice
        first = at + int(speech_onset(clip) * R)  # the person's first sample
        # silent from moi's last audible frame before the person ends: a reply that pauses and
        # goes on was not stopped (its answer to them cannot start before they end)
        loud = np.flatnonzero(frames_db(moi_only[first : at + len(clip)]) > AUDIBLE_DB)
        silences.append((loud[-1] + 1) / 100 if len(loud) else 0.0)
    return {"name": name, "self_turns": self_turns, "self_cuts": self_cuts, "went_on": went_on, "detected": detected,
            "trials": len(interruptions), "silence": statistics.median(silences) if silences else float("nan"),
            "worst": max(silences) if silences else float("nan"), "wer": statistics.mean(wers) if wers else float("nan"),
            "wer_alone": statistics.mean(alone) if alone else float("nan")}


def main() -> None:
    from local import echo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cancellers", default=",".join(echo.BACKENDS), help="comma-separated (installed ones run)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--no-live", action="store_true", help="only the offline comparison")
    parser.add_argument("--no-offline", action="store_true", help="only the live runs")
    parser.add_argument("--keep", help="a folder for each live run's recording, events and the canceller's signals "
                        "(bench/echo_replay.py replays those)")
    parser.add_argument("--echo-db", type=float, default=-9.0,
                        help="how loud the speaker is in the microphone, live (the person's sentences: as recorded)")
    parser.add_argument("--measure", nargs="+", type=Path, metavar="DIR",
                        help="only read again the live runs --keep kept in each DIR (with the bench as it is now)")
    args = parser.parse_args()
    if args.measure:
        return remeasure(args.measure, args.trials)
    names = []
    for name in args.cancellers.split(","):
        try:
            echo.backend(name)
            names.append(name)
        except ImportError as exc:
            console.print(f"[dim]{name}: not installed ({exc}): {echo.INSTALL.get(name, '')}[/]")
    if not args.no_offline:
        with console.status("offline: ten replies through each canceller…"):
            rows = offline(names)
        show("Echo cancellers offline: 10 Kokoro replies, laptop echo 30–80 ms late, 6–12 dB down",
             ["canceller", "echo removed (median)", "own turns, first 1.5 s", "own turns, after",
              "WER over moi (alone: 0)", "CPU per s of audio (one core)"], rows)
    if args.no_live:
        return
    clips = _trial_clips(args.trials)
    columns = _columns(_alone_wer(clips))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in names:
            with console.status(f"live: {name}…") as status:
                r = live(name, clips, args.trials, tmp, status, echo_db=args.echo_db,
                         record=tmp / f"{name}.signals" if args.keep else None)
            rows.append(_row(r))
            console.print(f"{name}: " + ", ".join(f"{c.split(' (')[0]} {v}" for c, v in zip(columns[1:], rows[-1][1:])))
    show(f"Talking over moi, live on the virtual card (loopback {-args.echo_db:g} dB down, 50 ms late)", columns, rows)


def _columns(alone: float) -> list[str]:
    return ["canceller", "self-interruptions (target 0)", "interruptions heard (≥ 9/10)",
            "to silence, median (≤ 0.3 s)", "worst", f"WER over moi (≤ alone + 0.05; offline alone {alone:.3f})",
            "WER of the same sentences asked alone, live", "paused for nobody (went on)"]


def _row(r: dict) -> list[object]:
    return [r["name"], r["self_turns"] + r["self_cuts"], f"{r['detected']}/{r['trials']}",
            f"{r['silence']:.3f} s", f"{r['worst']:.3f} s", f"{r['wer']:.3f}", f"{r['wer_alone']:.3f}", r["went_on"]]


def remeasure(folders: list[Path], trials: int) -> None:
    """Live runs read again from what ``--keep`` kept (each canceller's recording and events),
    with the bench's measure as it is now: a fix to the measure applies to old runs too."""
    kept = {folder: sorted(folder.glob("*.events.json")) for folder in folders}
    for folder, runs in kept.items():  # before Whisper loads
        if not runs:
            raise SystemExit(f"{folder}: no live run kept there (bench/echo.py --keep {folder})")
    clips = _trial_clips(trials)
    by_text = dict(clips)
    rows = []
    for folder, runs in kept.items():
        for events in runs:
            name = events.name.removesuffix(".events.json")
            run = json.loads(events.read_text())
            pcm = _read_bus(folder / f"{name}.raw")
            people = [(t, text, by_text[text]) for t, text in run["people"]]
            rows.append(_row({**measure(name, run["events"], people, pcm, run["rec_started"]), "name": f"{folder.name}: {name}"}))
    show("Live runs read again", _columns(_alone_wer(clips)), rows)


def _trial_clips(trials: int) -> list[tuple[str, Audio]]:
    """The sentences a live run plays, in order: a warm-up, then a question and a sentence over
    its reply for each trial (the recordings' sentences over again where there are too few)."""
    clips = questions(2 * trials + 1)
    return [clips[i % len(clips)] for i in range(2 * trials + 1)]


def _read_bus(path: Path) -> np.ndarray:
    """A recording of the bus (record_bus: s16le) as float32."""
    return np.frombuffer(path.read_bytes(), "<i2").astype(np.float32) / 32768


def _alone_wer(clips: list[tuple[str, Audio]]) -> float:
    """The interrupting sentences transcribed alone by moi's default Whisper: the WER baseline."""
    from cloud.stt import SpeechToText
    from shared.models import resolve

    stt = SpeechToText(resolve("stt"))
    over = clips[2::2]
    return statistics.mean(wer(text, stt.transcribe(clip).text) for text, clip in over)


if __name__ == "__main__":
    main()
