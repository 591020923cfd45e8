"""Run as a script by tests/local/test_session.py: a live session whose first turn raises a
non-MoiError deep inside the engine (as a bug or a library error would), over a file played in
real time and then silence, in quiet mode. The test reads its output and presses Ctrl-C."""

import sys
from itertools import chain, repeat
from pathlib import Path

from cloud.engine import LocalEngine
from cloud.pipeline import file_source
from local.run import paced, run_live
from shared.audio import Audio
from shared.config import Config


class Faulty(LocalEngine):
    """Not a model: the real engine, whose first transcription raises a KeyError."""

    calls = 0

    def transcribe(self, audio, **kw):
        Faulty.calls += 1
        if Faulty.calls == 1:
            raise KeyError("segments")
        return super().transcribe(audio, **kw)


if __name__ == "__main__":
    cfg = Config.load(llm__max_tokens=16)
    source = paced(chain(file_source(Path(sys.argv[1])), repeat(Audio.silence(0.1))))
    code = run_live(cfg, source, None, variant="chat", mode="quiet", engine=Faulty(cfg), hears_player=False)
    print(f"exit {code}", flush=True)
    sys.exit(code)
