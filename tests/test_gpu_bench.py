"""bench/gpu.py --smoke: the GPU half's code path (the project's TransformersChat with its
static cache and device-side guard against plain generate, Whisper, Kokoro, a whole turn) on
the CPU with a toy-shaped model, so it keeps working on machines without a GPU."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_gpu_bench_runs_its_smoke_on_the_cpu():
    r = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("SMOKE", "project / plain generate", "stt:", "tts:", "turn: utterance in → first reply audio"):
        assert row in r.stdout, r.stdout
