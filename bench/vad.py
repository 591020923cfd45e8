"""Our Segmenter (SileroVad + state machine) against a bare onnxruntime Silero loop.

Same model file, same audio, one thread each; runs interleaved (ours, bare, ours, bare…).
The bare loop is Silero's own: context + window in, state carried, nothing else.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

from _common import SPEECH, median, show, timed, verdict
from cloud.vad import CONTEXT, WINDOW, Segmenter, SileroVad
from shared.audio import SPEECH_RATE, Audio, decode
from shared.config import VadConfig
from shared.models import resolve


def bare_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def bare_probs(session: ort.InferenceSession, samples: np.ndarray) -> list[float]:
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    sr = np.array(SPEECH_RATE, np.int64)
    probs = []
    for i in range(0, len(samples) - WINDOW + 1, WINDOW):
        x = np.concatenate([context, samples[i : i + WINDOW].reshape(1, -1)], axis=1)
        out, state = session.run(None, {"input": x, "state": state, "sr": sr})
        context = x[:, -CONTEXT:]
        probs.append(float(out[0, 0]))
    return probs


def ours(segmenter: Segmenter, chunks: list[Audio]) -> tuple[list[float], int]:
    """Probabilities of every window and the number of utterances kept."""
    segmenter.reset()
    probs, events = [], []
    for chunk in chunks:
        events += segmenter.feed(chunk)
        probs += segmenter.probs
    events += segmenter.flush()
    return probs, sum(1 for e in events if getattr(e, "audio", None) is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="timed runs of each (median reported)")
    ap.add_argument("--chunk", type=float, default=0.1, help="seconds of audio per Segmenter.feed")
    ap.add_argument("--audio", type=Path, default=SPEECH)
    args = ap.parse_args()

    model = resolve("vad").path
    audio = decode(args.audio)
    step = round(args.chunk * SPEECH_RATE)
    chunks = [Audio(audio.samples[i : i + step], SPEECH_RATE) for i in range(0, len(audio), step)]
    segmenter = Segmenter(SileroVad(model), VadConfig())
    session = bare_session(model)

    ours_p, utterances = ours(segmenter, chunks)  # also the warm-up
    bare_p = bare_probs(session, audio.samples)
    windows = len(bare_p)
    diff = float(np.max(np.abs(np.subtract(ours_p, bare_p)))) if windows == len(ours_p) else float("nan")

    t_ours, t_bare = [], []
    for _ in range(args.repeat):
        t_ours.append(timed(lambda: ours(segmenter, chunks)))
        t_bare.append(timed(lambda: bare_probs(session, audio.samples)))
    mo, mb = median(t_ours), median(t_bare)
    show(
        f"VAD: {args.audio.name} ({audio.seconds:.0f} s, {windows} windows), {args.repeat} runs each",
        ["", "ours (Segmenter)", "bare onnxruntime", "ours / bare"],
        [
            ["wall time, median", f"{mo * 1e3:.1f} ms", f"{mb * 1e3:.1f} ms", verdict(mo / mb, 1.1)],
            ["wall time, best", f"{min(t_ours) * 1e3:.1f} ms", f"{min(t_bare) * 1e3:.1f} ms",
             f"{min(t_ours) / min(t_bare):.2f}x"],
            ["per window, median", f"{mo / windows * 1e6:.0f} µs", f"{mb / windows * 1e6:.0f} µs", ""],
            ["real-time factor", f"{mo / audio.seconds:.4f}", f"{mb / audio.seconds:.4f}", ""],
        ],
        caption=f"target: ours / bare ≤ 1.1x · fed in {args.chunk:g} s chunks · {utterances} utterances"
        f" · max |Δp| ours vs bare {diff:.1e}",
    )


if __name__ == "__main__":
    main()
