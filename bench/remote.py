"""End of speech → first reply audio: in-process vs a `moi serve` gateway on loopback, one run.

The remote side is a real `moi serve` process (its own models, as a GPU box would have) and the
client is the HttpEngine: one `/v1/turn` request per utterance, the reply's frames streamed back.
Both start the clock when the utterance is handed to the engine (the VAD's cut) and stop it when
the first reply audio is in this process, ready for the player. Turns are interleaved (local,
remote, local, …) from the same empty thread, so at temperature 0 both say the same. What the
difference measures is what one HTTP round trip costs: upload, framing, and the event loop.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import SPEECH, console, median, show, start_server  # noqa: E402
from cloud.engine import LocalEngine  # noqa: E402
from cloud.vad import Segmenter, SileroVad, SpeechEnd  # noqa: E402
from cloud.pipeline import file_source  # noqa: E402
from local.remote import HttpEngine, RemoteConfig  # noqa: E402
from shared.config import Config  # noqa: E402
from shared.engine import TurnRequest  # noqa: E402
from shared.events import ReplyAudio, ReplyText, TurnDone  # noqa: E402
from shared.messages import ChatOptions, Thread  # noqa: E402
from shared.models import resolve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.1  # remote may add at most this to first audio


def turn(engine, cfg: Config, utterance) -> tuple[float, float, str]:  # noqa: ANN001
    """(first audio, total, reply) of one turn from an empty thread, as the pipeline sends it."""
    thread = Thread(cfg.llm.system_prompt, cfg.llm.max_turns)
    llm = cfg.llm
    request = TurnRequest(tuple(thread.messages()), ChatOptions(max_tokens=llm.max_tokens, temperature=llm.temperature,
                                                                seed=llm.seed, repeat_penalty=llm.repeat_penalty), turn=1)
    start = time.monotonic()
    first, total, reply = float("nan"), float("nan"), ""
    for ev in engine.turn(utterance, request, cancel=threading.Event()):
        if isinstance(ev, ReplyAudio) and first != first:
            first = time.monotonic() - start
        elif isinstance(ev, ReplyText):
            reply = ev.text
        elif isinstance(ev, TurnDone):
            total = time.monotonic() - start
    return first, total, reply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utterances", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    cfg = Config.load(llm__max_tokens=args.max_tokens)

    seg = Segmenter(SileroVad(resolve("vad").path), cfg.vad)
    events = [e for chunk in file_source(SPEECH) for e in seg.feed(chunk)] + seg.flush()
    utterances = [e.audio for e in events if isinstance(e, SpeechEnd) and e.audio is not None][: args.utterances]

    local = LocalEngine(cfg)
    with console.status("loading models here and in `moi serve`…"):
        local.warm()
        proc, url = start_server(env={"MOI_LLM_MAX_TOKENS": str(args.max_tokens)})
    try:
        remote = HttpEngine(RemoteConfig(url, read_timeout_s=120, first_byte_s=120))
        turn(local, cfg, utterances[0])  # warm-up, both paths
        turn(remote, cfg, utterances[0])
        rows, deltas, same = [], [], 0
        for i, utt in enumerate(utterances, 1):
            with console.status(f"utterance {i}/{len(utterances)}…"):
                lf, lt, lreply = turn(local, cfg, utt)
                rf, rt, rreply = turn(remote, cfg, utt)
            same += lreply == rreply
            deltas.append(rf - lf)
            rows.append([f"{i} ({utt.seconds:.1f} s)", f"{lf:.2f} s", f"{rf:.2f} s", f"{rf - lf:+.3f} s",
                         f"{lt:.2f} / {rt:.2f} s"])
        remote.close()
    finally:
        proc.kill()
        proc.wait()
    d = median(deltas)
    rows.append(["median", f"{median([float(r[1][:-2]) for r in rows]):.2f} s",
                 f"{median([float(r[2][:-2]) for r in rows]):.2f} s",
                 f"{d:+.3f} s " + ("[green]✓[/]" if d <= TARGET_S else "[red]✗[/]"), ""])
    show(
        f"End of speech → first audio: in-process vs `moi serve` on loopback ({len(utterances)} utterances, "
        f"chat, max {args.max_tokens} tokens)",
        ["utterance", "local", "remote", "remote − local", "whole turn local / remote"],
        rows,
        caption=f"target: remote adds ≤ {TARGET_S:g} s · one HTTP request per turn · same reply in "
        f"{same}/{len(utterances)} turns",
    )


if __name__ == "__main__":
    main()
