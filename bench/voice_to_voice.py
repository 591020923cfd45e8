"""Voice to voice, as a person hears it: end of the last spoken word → first audible sample of
the reply, with moi running live (`moi --input mic --output speaker`, defaults) on the
PulseAudio virtual sound card, for --local and for --remote against `moi serve` on loopback.

One clock for both ends: a null sink `moi_rec` is recorded for the whole run, fed by a combine
sink `moi_in` (what we play: the virtual microphone + moi_rec) and a loopback from the monitor
of the virtual speaker moi plays to. So the question and the reply land in one recording.
Each question is a sentence of a real recording (tests/data), cut at the end of its last word
by word timestamps measured once (Whisper base, word alignment); its end in the recording is
where the question was found (cross-correlation) plus the clip's length.

The per-stage split comes from moi's own `--json` events: speech-to-text, LLM to the first
piece and TTS of the first piece from `turn_done`; the VAD's wait from the end of the last word
to where the VAD cut (on moi's input stream, aligned to the recording where moi saw the
question start); the turn decision from the cut to the turn's start (moi's clock); the player
(capture and output buffers, the sound server) is what remains of the heard figure.

The card itself is measured first (``card_round_trip``): a beep into the microphone and a
program with moi's stream settings that answers the first loud block with a tone, no model in
between. That round trip (~0.1 s on PulseAudio's null sinks: the microphone's 32 ms blocks,
PortAudio's 40 ms output buffer, the loopback's few ms) is inside every heard figure; each
mode's median is also given less it.

A question counts as answered only when its reply was handed to the speaker after its last
word (else it is "talked over", whatever the latency would have read) and a turn not stopped
answered it; each mode also reports what Whisper made of each question: the words misheard
(the WER of the last transcript against the question's own words) and the words lost (those
the live transcript drops beyond what the same model drops of the whole clip in process, with
the silence the VAD's pre- and post-roll put around it: a word the live path cut off or never
passed on). Runs outside CI (it takes a few minutes); nothing else should run meanwhile.
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
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import AUDIO_DIR, SPEECH, console, end, record_bus, show, start_server, thread_cpu  # noqa: E402
from shared.audio import SPEECH_RATE, Audio, decode  # noqa: E402
from shared.text import spoken_words  # noqa: E402
from tests import pulse  # noqa: E402

BIN = Path(sys.executable).parent
REC, IN, OUT = "moi_rec", "moi_in", "moi_out"  # OUT: the combine sink older runs played to
# a new loopback carries ~1 s more for its first seconds, then its few ms
LOOPBACK_SETTLE_S = 10.0
TARGET_S = 1.0  # on the way to 0.8
AUDIBLE_DB = -45.0  # a 10 ms frame louder than this is sound (the null sinks are digital silence)


@dataclass
class Turn:
    question: str
    played_at: float  # bench clock, paplay started
    events: list[tuple[float, dict]] = field(default_factory=list)


def questions(n: int) -> list[tuple[str, Audio]]:
    """Sentences of real recordings, each cut from its first word's start to its last word's end;
    a sentence too long to ask (over 9 s) gives its clauses that end on a pause instead."""
    from faster_whisper import WhisperModel

    from shared.models import resolve

    model = WhisperModel(str(resolve("stt", "base").path), device="cpu", compute_type="int8")
    out = []
    for path in (SPEECH, AUDIO_DIR / "two_speakers_stereo_5s.wav"):
        audio = decode(path)
        segments, _ = model.transcribe(audio.samples, language="en", beam_size=5, word_timestamps=True)
        words = [w for s in segments for w in s.words]
        db = frames_db(audio.samples)
        start = 0
        for i, w in enumerate(words):
            if not w.word.strip().endswith((".", "?", "!")):
                continue
            sentence, start = words[start : i + 1], i + 1
            if sentence[-1].end - sentence[0].start <= 9.0:
                parts = [sentence]
            else:  # its clauses: cut after a comma the speaker paused on (0.35 s or more)
                cuts = [j + 1 for j, x in enumerate(sentence[:-1])
                        if x.word.strip().endswith(",") and sentence[j + 1].start - x.end >= 0.35]
                parts = [sentence[a:b] for a, b in zip([0, *cuts], [*cuts, len(sentence)])]
            for part in parts:
                last = words.index(part[-1])
                clip = _clip(audio, db, part, words[last + 1].start if last + 1 < len(words) else audio.seconds)
                if clip is not None:
                    out.append(clip)
    return out[:n]


def _clip(audio: Audio, db: np.ndarray, words: list, until: float) -> tuple[str, Audio] | None:
    """``words`` of ``audio`` (1.2-9 s), up to where the recording goes quiet after the last
    (None: too short or long, or no quiet before the next word)."""
    a = words[0].start
    # Whisper's word end can fall inside the word's last sound: the speech ends where the
    # recording goes quiet (35 dB under the sentence's peak), before the next word starts.
    f0, f1 = int(a * 100), int(until * 100)
    floor = db[f0:f1].max() - 35
    span = range(int(words[-1].end * 100), f1)
    quiet = next((f for f in span if (db[f : f + 3] < floor).all()), None)
    if quiet is None and len(span):  # no pause: the deepest dip before the next word, if deep enough
        dip = min(span, key=lambda f: db[f])
        quiet = dip if db[dip] < floor + 10 else None
    if quiet is None:  # the next word follows without a dip: not an end a person would stop at
        return None
    b = quiet / 100
    if not 1.2 <= b - a <= 9.0:
        return None
    return "".join(x.word for x in words).strip(), audio.slice(max(0.0, a - 0.05), b)


def card() -> None:
    """The virtual card of tests/pulse.py plus the recording bus: the combine sink `moi_in` for
    what we play, and a loopback from the virtual speaker's monitor for what moi plays.

    moi plays to the virtual speaker itself, as to a laptop's card: through a combine sink, ALSA's
    PulseAudio plugin kept 240 ms queued in front of it (a null sink: 40 ms, PortAudio's own
    buffer), a delay of this bench's, not of moi or a laptop. The loopback adds its few ms to
    every reply, which counts against moi."""
    pulse.start()
    sinks = subprocess.run(["pactl", "list", "short", "sinks"], capture_output=True, text=True).stdout
    if REC not in sinks:
        subprocess.run(["pactl", "load-module", "module-null-sink", f"sink_name={REC}"], check=True, capture_output=True)
    if IN not in sinks:
        subprocess.run(["pactl", "load-module", "module-combine-sink", f"sink_name={IN}",
                        f"slaves={pulse.MIC},{REC}", "adjust_time=0"], check=True, capture_output=True)
    modules = subprocess.run(["pactl", "list", "short", "modules"], capture_output=True, text=True).stdout
    for line in modules.splitlines():  # the combine sink of an older run of this bench
        if f"sink_name={OUT}" in line:
            subprocess.run(["pactl", "unload-module", line.split()[0]], check=True)
    if f"source={pulse.SPEAKER}.monitor sink={REC}" not in modules:
        subprocess.run(["pactl", "load-module", "module-loopback", f"source={pulse.SPEAKER}.monitor", f"sink={REC}",
                        "latency_msec=1", "source_dont_move=true", "sink_dont_move=true"], check=True, capture_output=True)
        time.sleep(LOOPBACK_SETTLE_S)
    subprocess.run(["pactl", "set-default-sink", pulse.SPEAKER], check=True)


def card_round_trip(tmp: Path, trials: int = 5) -> list[float]:
    """The virtual card's own share of the heard figure: a 50 ms beep played as the questions
    are, and a program that answers the first loud block it captures with a tone, on moi's
    stream settings (32 ms input blocks; 20 ms output blocks at PortAudio's low latency), no
    model in between. Beep onset → tone onset on the same recording, per trial."""
    import sounddevice as sd

    rate = 48_000
    heard = threading.Event()
    tone = (0.5 * np.sin(2 * np.pi * 660 * np.arange(rate // 2) / rate)).astype(np.float32)
    left = [np.zeros(0, np.float32)]

    def mic(indata, frames, t, status) -> None:  # noqa: ANN001 - PortAudio's signature
        if not heard.is_set() and np.abs(indata).max() > 0.1:
            heard.set()
            left[0] = tone

    def speaker(outdata, frames, t, status) -> None:  # noqa: ANN001
        n = min(frames, len(left[0]))
        outdata[:n, 0], outdata[n:, 0] = left[0][:n], 0.0
        left[0] = left[0][n:]

    beep = Audio((0.5 * np.sin(2 * np.pi * 440 * np.arange(800) / SPEECH_RATE)).astype(np.float32), SPEECH_RATE)
    beep.save_wav(tmp / "beep.wav")
    out = []
    with sd.InputStream(channels=1, samplerate=rate, blocksize=int(rate * 0.032), callback=mic), \
            sd.OutputStream(channels=1, samplerate=rate, blocksize=int(rate * 0.02), latency="low", callback=speaker):
        for _ in range(trials):
            rec = record_bus(tmp / "floor.raw", f"{REC}.monitor")
            time.sleep(1.0)
            heard.clear()
            subprocess.run(["paplay", f"--device={IN}", str(tmp / "beep.wav")], check=True)
            time.sleep(1.0)
            end(rec)
            pcm = np.frombuffer((tmp / "floor.raw").read_bytes(), "<i2").astype(np.float32) / 32768
            loud = np.flatnonzero(np.abs(pcm) > 0.1)
            gap = np.flatnonzero(np.diff(loud) > SPEECH_RATE // 200)  # 5 ms of quiet between the two
            if len(loud) and len(gap):
                out.append(float(loud[gap[0] + 1] - loud[0]) / SPEECH_RATE)
    return out


def session(spec: str, clips: list[tuple[str, Audio]], tmp: Path, gap_s: float,
            cpu: list | None = None) -> tuple[list[Turn], np.ndarray, float]:
    """One live moi run: each question played after the previous reply has been heard.

    ``spec``: a mode, then any ``:NAME=VALUE`` settings for moi's environment (a lever's on and
    off side by side: ``local:MOI_TTS_THREADS=1``). ``cpu``: a list to fill with samples of
    each of moi's threads' CPU time through the run (:func:`sample_threads`)."""
    server = None
    cmd = [str(BIN / "moi"), "--input", "mic", "--output", "speaker", "--json", "--no-meters"]
    mode, *settings = spec.split(":")
    env = {**os.environ, "COLUMNS": "200", **dict(s.split("=", 1) for s in settings)}
    if mode == "silence":  # the lever's baseline: turns end on 500 ms of silence, no turn-end model
        env["MOI_VAD_TURN_MODEL"] = "off"
    busy = None
    if mode == "nospec":  # the lever's baseline: each turn starts when it is decided, not at the pause
        env["MOI_VAD_SPECULATE_MS"] = "0"
    if mode == "busy":  # another program keeps one core busy the whole run, as on a working laptop
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    if mode == "remote":
        server, url = start_server()
        cmd += ["--remote", "--url", url]
    else:
        cmd += ["--local"]  # local, silence, nospec, busy
    rec_path = tmp / "run.raw"
    rec = record_bus(rec_path, f"{REC}.monitor")
    rec_started = time.monotonic()
    moi = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    lines: queue.Queue[tuple[float, dict]] = queue.Queue()

    def read() -> None:
        for line in moi.stdout:
            try:
                lines.put((time.monotonic(), json.loads(line)))
            except json.JSONDecodeError:
                pass

    threading.Thread(target=read, daemon=True).start()
    if cpu is not None:
        threading.Thread(target=sample_threads, args=(moi, cpu), daemon=True).start()
    turns: list[Turn] = []
    try:
        _wait_for(lines, lambda ev: ev["type"] == "status", 120, moi)  # listening
        time.sleep(1.0)
        for text, clip in clips:
            path = tmp / "q.wav"
            clip.save_wav(path)
            turn = Turn(text, time.monotonic())
            subprocess.run(["paplay", f"--device={IN}", str(path)], check=True)
            heard, stopped = 0.0, set()
            while True:  # this question's events, until a turn not stopped is done
                t, ev = _next(lines, 120, moi)
                turn.events.append((t, ev))
                if ev["type"] == "reply_audio":
                    heard += ev["audio"]["seconds"]
                if ev["type"] == "stopped":
                    stopped.add(ev["turn"])
                if ev["type"] == "error" or (ev["type"] == "turn_done" and ev["turn"] not in stopped):
                    break
            turns.append(turn)
            until = time.monotonic() + heard + gap_s  # the reply plays out, then a pause
            while (left := until - time.monotonic()) > 0:  # anything more belongs to this question
                try:
                    turn.events.append(lines.get(timeout=left))
                except queue.Empty:
                    break
    finally:
        end(moi, rec, server, busy)
    pcm = np.frombuffer(rec_path.read_bytes(), "<i2").astype(np.float32) / 32768
    return turns, pcm, rec_started


def _next(lines: queue.Queue, timeout: float, proc: subprocess.Popen) -> tuple[float, dict]:
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise SystemExit(f"moi said nothing for {timeout:.0f} s: {proc.stderr.read()[-500:] if proc.poll() is not None else ''}")


def _wait_for(lines: queue.Queue, pred, timeout: float, proc: subprocess.Popen) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred(_next(lines, timeout, proc)[1]):
            return
    raise SystemExit("moi did not start listening")


def sample_threads(proc: subprocess.Popen, out: list, every_s: float = 0.01) -> None:
    """Every ``every_s`` until ``proc`` ends: (monotonic time, :func:`_common.thread_cpu` of
    ``proc``). Reading ~25 small files takes ~2 % of a core."""
    names: dict[str, list] = {}
    while proc.poll() is None:
        out.append((time.monotonic(), thread_cpu(proc.pid, names)))
        time.sleep(every_s)


STAGES = ("STT", "LLM → 1st", "TTS 1st")


def cpu_by_stage(turns: list[Turn], samples: list) -> dict[str, dict[str, float]]:
    """Cores each thread name kept busy during each stage of the answered turns (the stages
    from each ``turn_done``'s timings; the turn's start is its arrival less ``total``), pooled:
    CPU seconds over the stage's wall seconds."""
    times = [t for t, _ in samples]
    busy: dict[str, dict[str, float]] = {st: {} for st in STAGES}
    wall = dict.fromkeys(STAGES, 0.0)
    for turn in turns:
        done = [(t, ev) for t, ev in turn.events if ev["type"] == "turn_done" and "first_audio" in ev["timings"]]
        if not done:
            continue
        t, ev = done[-1]
        tm = ev["timings"]
        start = t - tm["total"]
        edges = [start, start + tm["stt"], start + tm["first_audio"] - tm["tts_first"], start + tm["first_audio"]]
        for stage, a, b in zip(STAGES, edges, edges[1:]):
            i, j = np.searchsorted(times, a), np.searchsorted(times, b, side="right") - 1
            if j <= i:
                continue
            wall[stage] += times[j] - times[i]
            before, after = samples[i][1], samples[j][1]
            for key, sec in after.items():
                name = key[0]
                busy[stage][name] = busy[stage].get(name, 0.0) + sec - before.get(key, sec)
    return {st: {n: v / wall[st] for n, v in busy[st].items()} for st in STAGES if wall[st] > 0}


def frames_db(pcm: np.ndarray, hop: int = SPEECH_RATE // 100) -> np.ndarray:
    n = len(pcm) // hop
    rms = np.sqrt(np.mean(np.square(pcm[: n * hop].reshape(n, hop)), axis=1) + 1e-12)
    return 20 * np.log10(rms)


def find(clip: Audio, pcm: np.ndarray, near: int, span: int) -> int:
    """Sample index in ``pcm`` where ``clip`` starts, searched within ``near`` ± ``span``."""
    lo, hi = max(0, near - span), min(len(pcm), near + span + len(clip))
    seg, ref = pcm[lo:hi], clip.samples
    n = 1 << int(np.ceil(np.log2(len(seg) + len(ref))))
    corr = np.fft.irfft(np.fft.rfft(seg, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(seg) - len(ref) + 1]
    return lo + int(np.argmax(corr))


def dry_time(pieces: list[tuple[float, float]]) -> float:
    """How long the speaker ran dry inside a reply: each piece (handed over at t, lasting s)
    plays once it is given and the one before has played out; the waits after the first add up."""
    dry, until = 0.0, None
    for t, s in pieces:
        if until is not None and t > until:
            dry += t - until
        until = max(t, until or t) + s
    return dry


def in_process(clips: list[tuple[str, Audio]], settings: dict[str, str] | None = None) -> list[list[str]]:
    """What moi's speech-to-text (defaults, or a mode's ``settings``) makes of each whole clip in
    process, with the silence a live utterance has around it (the VAD's pre-roll: 0-0.3 s
    before, 0-0.2 s after): Whisper drops words of its own there (tiny.en: "And this spills
    over…" with 0.3 s before it comes back "This spills over…"), which the live path did not
    lose."""
    from cloud.runners import Runners
    from shared.config import Config

    stt = Runners(Config.load(env={**os.environ, **(settings or {})})).stt
    out = []
    for _, clip in clips:
        padded = [Audio.concat([Audio.silence(before / 100), clip, Audio.silence(after / 100)])
                  for before in range(0, 31, 5) for after in (0, 10, 20)]
        out.append([stt.transcribe(a).text for a in padded])
    return out


def dropped(question: str, heard: str) -> int:
    """Words of ``question`` that ``heard`` has no word for (deletions when the two are aligned)."""
    return jiwer.process_words(" ".join(spoken_words(question)), " ".join(spoken_words(heard)) or "-").deletions


def measure(turns: list[Turn], clips: list[tuple[str, Audio]], pcm: np.ndarray, rec_started: float,
            alone: list[list[str]]) -> list[dict]:
    db = frames_db(pcm)
    hop = SPEECH_RATE // 100
    rows = []
    for turn, (_, clip), whole in zip(turns, clips, alone):
        near = int((turn.played_at - rec_started) * SPEECH_RATE)
        onset = find(clip, pcm, near, SPEECH_RATE)  # where the question starts in the recording
        end = onset + len(clip)  # the end of its last word
        first = -(-end // hop)  # the first frame wholly after the question: not its own last samples
        after = np.nonzero(db[first:] > AUDIBLE_DB)[0]
        stopped = {ev["turn"] for _, ev in turn.events if ev["type"] == "stopped"}
        done = next((ev for _, ev in turn.events if ev["type"] == "turn_done" and ev["turn"] not in stopped), None)
        start_ev = next((ev for _, ev in turn.events if ev["type"] == "speech_start"), None)
        # the last transcript (a reply withdrawn as the person went on is answered again with all
        # of it) against the question's words, and against the whole clip's in process
        said = ([""] + [ev["text"] for _, ev in turn.events if ev["type"] == "transcript"])[-1]
        wer = jiwer.wer(" ".join(spoken_words(turn.question)), " ".join(spoken_words(said)) or "-")
        words = {"question": turn.question, "said": said, "wer": wer,
                 "lost": max(0, dropped(turn.question, said) - max(dropped(turn.question, w) for w in whole))}
        first_reply = next((t for t, ev in turn.events if ev["type"] == "reply_audio"), None)
        if first_reply is not None and first_reply < rec_started + end / SPEECH_RATE:
            # a reply handed to the speaker before the question's last word: talked over, not fast
            rows.append({**words, "error": "talked over", "talked_over": 1})
            continue
        if done is None or not len(after):
            rows.append({**words, "error": "no reply heard"})
            continue
        heard = (first + int(after[0])) * hop
        cuts = sum(ev["type"] == "speech_end" for _, ev in turn.events)
        latency = (heard - end) / SPEECH_RATE
        tm = done["timings"]
        # moi's clock ↔ the recording: at speech_start, moi's VAD had the first speech window.
        row = {**words, "onset": onset / SPEECH_RATE, "end": end / SPEECH_RATE,
               "heard": heard / SPEECH_RATE, "latency": latency, "cuts": cuts, "stt": tm.get("stt", 0.0),
               "llm_first_piece": tm.get("first_audio", 0.0) - tm.get("stt", 0.0) - tm.get("tts_first", 0.0),
               "tts_first": tm.get("tts_first", 0.0), "first_audio": tm.get("first_audio", 0.0),
               "gaps": dry_time([(t, ev["audio"]["seconds"]) for t, ev in turn.events
                                 if ev["type"] == "reply_audio" and ev["turn"] == done["turn"]])}
        end_ev = next((ev for _, ev in turn.events if ev["type"] == "speech_end"), None)
        if start_ev is not None and end_ev is not None:
            # The recording and moi's input stream differ by a constant: found where moi's VAD saw
            # the question's first sound (Silero fires within a window or two of it, ~30-60 ms).
            clip_db = frames_db(clip.samples)
            first_sound = int(np.argmax(clip_db > clip_db.max() - 35)) / 100  # the first word's onset
            offset = start_ev["audio_t"] - (onset / SPEECH_RATE + first_sound)
            word_end = end / SPEECH_RATE + offset  # on moi's stream
            row["vad_wait"] = end_ev["decided_t"] - word_end  # to where the pause was judged over
            row["turn_p"] = end_ev.get("turn_p")
            row["decision"] = done["t"] - tm["total"] - end_ev["t"]  # the cut → the engine's turn starts
            row["player"] = latency - row["vad_wait"] - row["decision"] - row["first_audio"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=6, help="sentences to ask (≥ 5)")
    ap.add_argument("--modes", default="local,remote",
                    help="comma list: local, remote (moi serve on loopback), silence (local without the turn-end "
                    "model), nospec (local, turns not started at the pause), busy (local with another process "
                    "spinning on one core); each may add :NAME=VALUE settings for moi's environment, a lever "
                    "measured against the same mode without it (local,local:MOI_TTS_THREADS=1)")
    ap.add_argument("--rounds", type=int, default=1, help="run the modes this many times, interleaved; rows pooled")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds of quiet after each reply")
    ap.add_argument("--keep", type=Path, help="save each run's recording (WAV) and events here")
    ap.add_argument("--cpu", action="store_true",
                    help="also sample each of moi's threads' CPU time (Linux) and show the cores each kept busy per stage")
    args = ap.parse_args()
    clips = questions(args.questions)
    console.print(f"{len(clips)} questions: " + " | ".join(t for t, _ in clips))
    alone: dict[str, list[list[str]]] = {}  # by the mode's speech-to-text settings
    card()
    results: dict[str, list[dict]] = {}
    cpu: dict[str, list[dict[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="moi-v2v-") as tmp:
        floor = card_round_trip(Path(tmp))
        floor_s = statistics.median(floor) if floor else float("nan")
        console.print(f"the virtual card's own round trip (a beep in → a tone out, no model): median {floor_s:.3f} s "
                      f"({', '.join(f'{x:.3f}' for x in floor)})")
        for round_ in range(args.rounds):
            for mode in args.modes.split(","):
                samples: list | None = [] if args.cpu else None
                turns, pcm, started = session(mode, clips, Path(tmp), args.gap, samples)
                stt = dict(kv.split("=", 1) for kv in mode.split(":")[1:] if kv.startswith("MOI_STT_"))
                key = ",".join(f"{k}={v}" for k, v in sorted(stt.items()))
                if key not in alone:
                    alone[key] = in_process(clips, stt)
                rows = measure(turns, clips, pcm, started, alone[key])
                if samples:
                    cpu.setdefault(mode, []).append(cpu_by_stage(turns, samples))
                results.setdefault(mode, []).extend(rows)
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    name = mode.replace(":", "_").replace("=", "-") + (f"-{round_ + 1}" if args.rounds > 1 else "")
                    Audio(pcm, SPEECH_RATE).save_wav(args.keep / f"{name}.wav")
                    (args.keep / f"{name}.json").write_text(json.dumps(
                        {"rows": rows, "turns": [{"question": t.question, "played_at": t.played_at - started,
                                                  "events": [e for _, e in t.events]} for t in turns]}, indent=1))
    cols = ["latency", "cuts", "vad_wait", "decision", "stt", "llm_first_piece", "tts_first", "player", "gaps"]
    for mode, rows in results.items():
        table = []
        for r in rows:
            if "error" in r:
                table.append([r["question"][:24], r["error"], *[""] * (len(cols) - 1)])
            else:
                table.append([r["question"][:24], *(f"{r.get(c, float('nan')):.2f}" if c != "cuts" else str(r["cuts"])
                                                     for c in cols)])
        ok = [r for r in rows if "error" not in r]
        over = sum(r.get("talked_over", 0) for r in rows)
        misheard = statistics.mean(r["wer"] for r in rows) if rows else float("nan")
        words = sum(len(spoken_words(r["question"])) for r in rows)
        console.print(f"{mode}: answered after the question ended {len(ok)}/{len(rows)} · talked over {over} · "
                      f"words lost {sum(r['lost'] for r in rows)} of {words} (dropped beyond what Whisper drops of "
                      f"the whole clip in process) · misheard (WER against the questions) {misheard:.3f}")
        for r in rows:
            if r["lost"]:
                console.print(f"  lost {r['lost']}: {r['question']!r} heard as {r['said']!r}")
        if ok:
            heard = statistics.median(r["latency"] for r in ok)
            console.print(f"{mode}: median heard after {heard:.2f} s {'✓' if heard <= TARGET_S else '✗'} (target ≤ "
                          f"{TARGET_S} s); less the card's own round trip ({floor_s:.2f} s): {heard - floor_s:.2f} s")
        if ok:
            med = {c: statistics.median(r.get(c, float("nan")) for r in ok) for c in cols if c != "cuts"}
            table.append(["[bold]median[/]", f"{med['latency']:.2f}", str(sum(r["cuts"] for r in ok)),
                          *(f"{med[c]:.2f}" for c in cols[2:])])
            table.append(["worst", f"{max(r['latency'] for r in ok):.2f}", *[""] * (len(cols) - 1)])
        base, *settings = mode.split(":")
        title = {"local": "--local", "remote": "--remote (moi serve on loopback)",
                 "silence": "--local, turns ended by 500 ms of silence (MOI_VAD_TURN_MODEL=off)",
                 "nospec": "--local, each turn started when decided (MOI_VAD_SPECULATE_MS=0)",
                 "busy": "--local, one core kept busy by another process"}[base] + "".join(f", {s}" for s in settings)
        show(f"voice to voice, {title}: end of speech → first reply sound (s)",
             ["question", "heard after", "turns", "VAD wait", "decision", "STT", "LLM → 1st", "TTS 1st",
              "player + I/O", "reply ran dry"],
             table, caption=f"target: median ≤ {TARGET_S} s · {os.cpu_count()} cores · turns: utterances moi cut from the "
             "question (1 = answered once, at its end) · decision < 0: the turn started that long before it was "
             "decided (at the pause) · the recording's clock · reply ran dry: the time the speaker waited for a piece "
             "inside the reply, from moi's events")
        if mode in cpu:
            show_cpu(mode, cpu[mode])


def show_cpu(mode: str, runs: list[dict[str, dict[str, float]]]) -> None:
    """The cores each thread (by its OS name) kept busy during each stage, averaged over runs."""
    names = sorted({n for run in runs for st in run.values() for n in st},
                   key=lambda n: -sum(run.get(st, {}).get(n, 0.0) for run in runs for st in STAGES))
    rows = []
    for name in names:
        cells = [statistics.mean(run.get(st, {}).get(name, 0.0) for run in runs) for st in STAGES]
        if max(cells) >= 0.005:
            rows.append([name, *(f"{c:.2f}" for c in cells)])
    totals = [sum(statistics.mean(run.get(st, {}).get(n, 0.0) for run in runs) for n in names) for st in STAGES]
    rows.append(["[bold]all of moi[/]", *(f"{c:.2f}" for c in totals)])
    show(f"{mode}: cores each of moi's threads kept busy during the stages of a turn", ["thread", *STAGES], rows,
         caption=f"{os.cpu_count()} cores · CPU time from /proc/PID/task/*/schedstat over each stage's wall time, all "
         "answered turns · threads by their OS name: moi names its own (the models' pools and the main thread are "
         "'moi')")


if __name__ == "__main__":
    main()
