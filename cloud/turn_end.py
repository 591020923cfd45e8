"""End of turn: has the person finished, or only paused? Smart Turn v3.2 (pipecat-ai, BSD-2).

Silero says when a person is silent; it cannot say whether they are done. Waiting long after
every pause is what makes a voice assistant slow, and waiting short makes it interrupt people
who think aloud. Smart Turn reads the last ≤ 8 s of the utterance (16 kHz, as Whisper log-mel
features, which faster-whisper's feature extractor computes) and returns P(turn complete): a
short pause and a confident model end the turn early; an unfinished thought waits longer.

The model ships in the ``pipecat-ai`` wheel (``pip install --no-deps pipecat-ai``: the file
only, pipecat is never imported) and is resolved through :mod:`shared.models` like every other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.audio import SPEECH_RATE
from shared.config import single_thread_blas

WINDOW_S = 8  # the model sees exactly 8 s: older audio is dropped, shorter is padded in front


class SmartTurn:
    """P(the speaker has finished) for the end of an utterance; ~30 ms a call on one core."""

    def __init__(self, model_path: str | Path) -> None:
        import onnxruntime as ort
        from faster_whisper.feature_extractor import FeatureExtractor

        single_thread_blas()  # its features are asked for while Whisper encodes the speculated turn
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # it runs on the listening thread, beside the turn's models
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The model is int8 (QDQ). Fused into onnxruntime's int8 kernels, on an x86 CPU without
        # VNNI (AVX2 only) its answers went wrong: 0.50-0.83 "finished" in the lecture's
        # mid-sentence pause, where the same graph run in float says 0.03-0.07 (and a CPU with
        # VNNI agreed). Unfused, the weights are dequantized and the sums done in float.
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.features = FeatureExtractor(chunk_length=WINDOW_S)

    def __call__(self, samples: np.ndarray) -> float:
        """``samples``: 16 kHz mono float32, the utterance up to now (its trailing pause included)."""
        n = WINDOW_S * SPEECH_RATE
        x = np.asarray(samples[-n:], dtype=np.float32)
        x = np.pad(x, (n - len(x), 0))
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # as the model was trained (do_normalize)
        mel = self.features(x, padding=0)[:, : n // self.features.hop_length]
        (p,) = self.session.run(None, {"input_features": mel[None].astype(np.float32)})
        return float(p[0, 0])
