"""Batch: `moi transcribe` vs whisper-ctranslate2 (faster-whisper's own CLI, what a person with a
folder of recordings would otherwise run) on one folder of real recordings, side by side.

The folder (4 min, the formats people have): the 60 s lecture as FLAC and as an 8 kHz WAV, the
clatter recording as MP3, the lecture followed by the clatter as one 85 s MP3, the 4 s MP3 and
the 5 s stereo WAV. Every command runs as a user would type it (process start, imports and model
loading included), writing SRT, with the same model (the tiny.en pack, int8) and beam (5),
interleaved over ``--repeat`` rounds. Word error rates are of the SRT text against the
reference transcripts in tests/data/transcripts.json. The second table holds the per-file
figures behind the 1,000-hour Modal estimate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import jiwer
import srt

from _common import AUDIO_DIR, SPEECH, console, show
from cloud.longform import speech_windows
from local.batch import load_models, worker_spec
from shared.audio import Audio, Encoder, decode
from shared.config import Config
from shared.models import resolve
from shared.text import spoken_words

BIN = Path(sys.executable).parent
REFERENCE = {k: v for k, v in json.loads((AUDIO_DIR / "transcripts.json").read_text()).items() if not k.startswith("_")}


def _encode(audio: Audio, fmt: str, path: Path) -> None:
    enc = Encoder(fmt)
    path.write_bytes(enc.feed(audio) + enc.close())


def build_folder(root: Path) -> dict[str, str]:
    """The recordings, and each one's reference text by file stem."""
    root.mkdir(parents=True)
    lecture, clatter = decode(SPEECH), decode(AUDIO_DIR / "speech_with_clatter_16k.wav")
    ref_lecture, ref_clatter = REFERENCE["speech_60s_16k.wav"], REFERENCE["speech_with_clatter_16k.wav"]
    _encode(lecture, "flac", root / "lecture.flac")
    lecture.resample(8000).save_wav(root / "lecture_8k.wav")
    _encode(clatter, "mp3", root / "clatter.mp3")
    _encode(Audio.concat([lecture, clatter]), "mp3", root / "lecture_then_clatter.mp3")
    for name in ("comfyui_hotword.mp3", "two_speakers_stereo_5s.wav"):
        shutil.copy(AUDIO_DIR / name, root / name)
    return {
        "lecture": ref_lecture, "lecture_8k": ref_lecture, "clatter": ref_clatter,
        "lecture_then_clatter": f"{ref_lecture} {ref_clatter}",
        "comfyui_hotword": REFERENCE["comfyui_hotword.mp3"], "two_speakers_stereo_5s": REFERENCE["two_speakers_stereo_5s.wav"],
    }


def commands(src: Path, out: Path, model: Path) -> dict[str, list[str]]:
    files = sorted(str(p) for p in src.iterdir())
    wc2 = [str(BIN / "whisper-ctranslate2"), "--model_directory", str(model), "--compute_type", "int8",
           "--beam_size", "5", "--output_format", "srt", "--verbose", "False"]
    moi = [str(BIN / "moi"), "transcribe", str(src), "-f", "srt", "--force"]
    return {
        "wc2": [*wc2, "--output_dir", str(out / "wc2"), *files],
        "wc2 --batched True": [*wc2, "--batched", "True", "--output_dir", str(out / "wc2b"), *files],
        "moi": [*moi, "-o", str(out / "moi")],
        "moi --jobs 1": [*moi, "--jobs", "1", "-o", str(out / "moi1")],
    }


def wer(folder: Path, refs: dict[str, str]) -> float:
    """Word error rate of every SRT in ``folder`` against its reference, over all words."""
    truth, heard = [], []
    for stem, ref in refs.items():
        cues = srt.parse((folder / f"{stem}.srt").read_text())
        truth.append(" ".join(spoken_words(ref)))
        heard.append(" ".join(spoken_words(" ".join(c.content for c in cues))))
    return jiwer.wer(truth, heard)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds per command (median)")
    ap.add_argument("--gpu-rtf", type=float, default=0.02,
                    help="ASSUMED GPU seconds per audio second for Whisper base.en fp16 on the Modal GPU")
    ap.add_argument("--gpu-price", type=float, default=0.80, help="USD per GPU-hour (Modal's L4 list price)")
    ap.add_argument("--containers", type=int, default=20, help="GPU containers running at once")
    ap.add_argument("--cold-start-s", type=float, default=30.0, help="ASSUMED container start + model load")
    ap.add_argument("--uplink-mbps", type=float, default=100.0, help="your upload bandwidth (Mbit/s)")
    args = ap.parse_args()
    if not (BIN / "whisper-ctranslate2").exists():
        raise SystemExit("whisper-ctranslate2 is not installed: pip install -e '.[dev]'")

    cfg = Config.load()
    model = resolve("stt", cfg.stt.model)
    with tempfile.TemporaryDirectory(prefix="moi-bench-") as tmp:
        src, out = Path(tmp) / "recordings", Path(tmp) / "out"
        refs = build_folder(src)
        files = sorted(src.iterdir())
        audio = [decode(p) for p in files]
        audio_s = sum(a.seconds for a in audio)
        console.print(f"{len(files)} files, {audio_s:.1f} s of audio ({audio_s / 60:.1f} min); model {model.name} "
                      f"({model.path}), beam 5, srt")
        cmds = commands(src, out, model.path)
        walls: dict[str, list[float]] = {k: [] for k in cmds}
        for r in range(args.repeat):
            for name, cmd in cmds.items():
                t = time.perf_counter()
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                walls[name].append(time.perf_counter() - t)
                if done.returncode:
                    raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
                console.print(f"  round {r + 1}: {name}: {walls[name][-1]:.1f} s")
        folders = {"wc2": "wc2", "wc2 --batched True": "wc2b", "moi": "moi", "moi --jobs 1": "moi1"}
        peer = statistics.median(walls["wc2"])
        best_peer = statistics.median(walls["wc2 --batched True"])
        rows = []
        for name in cmds:
            med = statistics.median(walls[name])
            rows.append([name, f"{med:.1f} s", f"{min(walls[name]):.1f} s", f"{audio_s / med:.1f}",
                         f"{wer(out / folders[name], refs):.3f}", f"{peer / med:.2f}x", f"{best_peer / med:.2f}x"])
        show(
            f"batch: {len(files)} files, {audio_s / 60:.1f} min of audio, {args.repeat} rounds",
            ["command", "median wall", "best", "audio s/s", "WER", "vs wc2", "vs wc2 --batched"],
            rows,
            caption="wc2 = whisper-ctranslate2 · moi = moi transcribe (default workers) · target: moi >= 1.5x wc2 "
            "(its defaults) at equal or better WER · wall is the whole command: start, model load, decoding, "
            "writing · WER against tests/data/transcripts.json",
        )

        # --- per-file figures for the Modal estimate --------------------------------------
        manifest = json.loads((out / "moi" / "moi-manifest.json").read_text())["files"]
        per_file = [f["processing_s"] for f in manifest.values()]
        spec = worker_spec(cfg, 2)
        t = time.perf_counter()
        models = load_models(spec)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        windows = [speech_windows(a, models.vad, replace(spec.vad_cfg, max_utterance_s=29.0), 3.0) for a in audio]
        vad_s = time.perf_counter() - t
        n_windows = sum(len(w) for w in windows)
        speech_s = sum(b - a for w in windows for a, b in w)
        in_bytes = sum(p.stat().st_size for p in files)
        moi_wall = statistics.median(walls["moi"])
        hour = 3600.0
        show(
            "measured per-file figures (moi transcribe, default workers)",
            ["figure", "value"],
            [
                ["mean file length", f"{audio_s / len(files):.1f} s"],
                ["mean processing per file (1 worker, 1 core)", f"{statistics.mean(per_file):.2f} s"],
                ["CPU RTF per worker (processing s / audio s)", f"{sum(per_file) / audio_s:.3f}"],
                ["throughput on this machine", f"{audio_s / moi_wall:.1f} audio s per s"],
                ["speech share sent to Whisper (VAD windows)", f"{speech_s / audio_s:.0%}"],
                ["Whisper windows (30 s encoder passes) per audio hour", f"{n_windows / audio_s * hour:.0f}"],
                ["VAD time per audio hour (1 core)", f"{vad_s / audio_s * hour:.0f} s"],
                ["model load per worker (Whisper + Silero)", f"{load_s:.2f} s"],
                ["input bytes per audio hour (this mix)", f"{in_bytes / audio_s * hour / 1e6:.0f} MB"],
                ["  16 kHz PCM16 WAV / 64 kbit/s MP3", f"{32_000 * hour / 1e6:.0f} MB / {8_000 * hour / 1e6:.0f} MB"],
            ],
        )

        # --- the worked estimate ------------------------------------------------------------
        total = 1000 * hour
        n_files = total / (audio_s / len(files))
        gpu_s = total * args.gpu_rtf + args.containers * args.cold_start_s
        upload_wav_h = total * 32_000 * 8 / (args.uplink_mbps * 1e6) / hour
        upload_mp3_h = total * 8_000 * 8 / (args.uplink_mbps * 1e6) / hour
        gpu_wall_h = gpu_s / args.containers / hour
        local_h = total / (audio_s / moi_wall) / hour
        show(
            "1,000 h of audio: worked estimate",
            ["quantity", "value", "from"],
            [
                ["inputs to .map", f"{n_files:,.0f} files", "1,000 h / measured mean file length"],
                ["GPU time", f"{gpu_s / hour:,.1f} GPU-h",
                 f"3.6M audio s x {args.gpu_rtf} (assumed) + {args.containers} x {args.cold_start_s:.0f} s cold starts"],
                ["GPU cost", f"${gpu_s / hour * args.gpu_price:,.0f}", f"x ${args.gpu_price:.2f} per GPU-h"],
                ["GPU wall time", f"{gpu_wall_h:,.1f} h", f"over {args.containers} containers"],
                ["upload, 16 kHz WAV", f"{upload_wav_h:,.1f} h", f"{total * 32_000 / 1e9:,.0f} GB at {args.uplink_mbps:g} Mbit/s"],
                ["upload, 64 kbit/s MP3", f"{upload_mp3_h:,.1f} h", f"{total * 8_000 / 1e9:,.0f} GB at {args.uplink_mbps:g} Mbit/s"],
                ["same work on this 2-core machine", f"{local_h:,.0f} h ({local_h / 24:,.1f} days)",
                 "measured throughput, moi transcribe"],
            ],
            caption="GPU RTF and cold start are assumptions, not measured here (no GPU on this machine): faster-whisper's "
            "README has large-v2 fp16 at RTF ~0.08 on an RTX 3070 Ti; base.en is ~20x smaller. Measure with "
            "`moi transcribe --remote` before trusting. L4 price: Modal's list price (~$0.80/h)",
        )


if __name__ == "__main__":
    main()
