"""Per-turn time through the gateway on loopback vs the in-process engine, same utterances.

Both engines share one set of loaded models (the gateway runs in this process on uvicorn, as
`moi serve` would), so the difference is what HTTP costs: PCM16 WAV upload, SSE tokens,
streamed PCM back. Turns are interleaved (local, remote, local, …); each engine starts every
turn from the same empty thread, so at temperature 0 both produce the same reply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import SPEECH, console, median, show, verdict  # noqa: E402
from cloud.http import RunnerBackend, create_app  # noqa: E402
from local.engine import LocalEngine  # noqa: E402
from local.pipeline import Pipeline, file_source  # noqa: E402
from local.remote import RemoteConfig, RemoteEngine  # noqa: E402
from local.vad import Segmenter, SileroVad, SpeechEnd  # noqa: E402
from shared.config import Config  # noqa: E402
from shared.events import ReplyText, TurnDone  # noqa: E402
from shared.models import resolve  # noqa: E402
from tests.conftest import serve  # noqa: E402

TARGET = 1.1


def turn(engine, cfg: Config, utterance) -> tuple[dict[str, float], str]:  # noqa: ANN001
    pipe = Pipeline(engine, Segmenter(SileroVad(resolve("vad").path), cfg.vad), cfg, "chat")
    timings, reply = {}, ""
    for ev in pipe.turn(utterance):
        if isinstance(ev, TurnDone):
            timings = ev.timings
        elif isinstance(ev, ReplyText):
            reply = ev.text
    return timings, reply


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
    with console.status("loading models…"):
        local.warm()
    with serve(create_app(RunnerBackend(local.runners))) as url:
        remote = RemoteEngine(RemoteConfig(url, read_timeout_s=120, first_byte_s=120))
        turn(local, cfg, utterances[0])  # warm-up, both paths
        turn(remote, cfg, utterances[0])
        rows, ratios, same = [], [], 0
        for i, utt in enumerate(utterances, 1):
            lt, lreply = turn(local, cfg, utt)
            rt, rreply = turn(remote, cfg, utt)
            same += lreply == rreply
            ratio = rt["total"] / lt["total"]
            ratios.append(ratio)
            rows.append([f"{i} ({utt.seconds:.1f} s)", f"{lt['total']:.2f} s", f"{rt['total']:.2f} s", f"{ratio:.2f}x",
                         f"{lt.get('first_audio', 0):.2f} / {rt.get('first_audio', 0):.2f} s"])
        remote.close()
    rows.append(["median", "", "", verdict(median(ratios), TARGET), ""])
    show(
        f"Turn time: in-process vs gateway on loopback ({len(utterances)} utterances, chat, max {args.max_tokens} tokens)",
        ["utterance", "local", "remote", "remote/local", "first audio local / remote"],
        rows,
        caption=f"target: remote/local ≤ {TARGET}x · same reply text in {same}/{len(utterances)} turns",
    )


if __name__ == "__main__":
    main()
