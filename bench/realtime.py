"""End of speech → first reply audio: the Realtime WebSocket (server VAD) beside `/v1/turn`, one run.

Both talk to one real `moi serve` process on loopback. Each question (a sentence of a real
recording, cut where its last word ends) is asked from an empty conversation both ways, in turn:

- **realtime**: the official `openai` SDK's realtime client streams 0.3 s of silence, the
  question and 2.5 s of silence as PCM16 24 kHz in 100 ms chunks, paced in real time as a
  microphone would send them; the server's VAD and Smart Turn decide the turn. The clock starts
  when the question's last chunk is sent and stops at the first `response.output_audio.delta`.
  The turn decision (to `input_audio_buffer.committed`) is part of it.
- **/v1/turn**: the question is posted whole the moment it ends (an oracle turn decision: zero
  wait) by the laptop's HttpEngine; the clock stops at the first reply audio frame.

So "realtime − turn" is what the server's turn decision plus the socket cost; a person on the
realtime path hears the first figure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import console, median, show, start_server  # noqa: E402
from voice_to_voice import questions  # noqa: E402
from local.remote import HttpEngine, RemoteConfig  # noqa: E402
from shared.audio import Audio  # noqa: E402
from shared.config import Config  # noqa: E402
from shared.engine import TurnRequest  # noqa: E402
from shared.events import ReplyAudio  # noqa: E402
from shared.messages import ChatOptions, Thread  # noqa: E402

RATE = 24_000
CHUNK_S = 0.1


async def realtime(url: str, question: Audio) -> tuple[float, float]:
    """(end of speech → committed, → first audio delta) over one fresh connection."""
    from openai import AsyncOpenAI

    pcm = Audio.concat([Audio.silence(0.3), question, Audio.silence(2.5)]).resample(RATE).to_pcm16()
    step = int(CHUNK_S * RATE) * 2
    speech_end = (0.3 + question.seconds)
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="-").realtime.connect(model="moi") as conn:
        ended: list[float] = []
        committed: list[float] = []
        first: list[float] = []

        async def send() -> None:
            start = time.monotonic()
            for n, i in enumerate(range(0, len(pcm), step)):
                await asyncio.sleep(max(0.0, start + n * CHUNK_S - time.monotonic()))
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + step]).decode())
                if not ended and (i + step) / 2 / RATE >= speech_end:
                    ended.append(time.monotonic())

        sending = asyncio.create_task(send())
        async for ev in conn:
            if ev.type == "input_audio_buffer.committed":
                committed.append(time.monotonic())
            elif ev.type == "response.output_audio.delta":
                first.append(time.monotonic())
                break
        sending.cancel()
    return committed[0] - ended[0], first[0] - ended[0]


def turn(engine: HttpEngine, cfg: Config, question: Audio) -> float:
    """End of speech → first reply audio over /v1/turn, the utterance posted the moment it ends."""
    llm = cfg.llm
    request = TurnRequest(tuple(Thread(llm.system_prompt, llm.max_turns).messages()),
                          ChatOptions(max_tokens=llm.max_tokens, temperature=llm.temperature, seed=llm.seed,
                                      repeat_penalty=llm.repeat_penalty), turn=1)
    start = time.monotonic()
    for ev in engine.turn(question, request, cancel=threading.Event()):
        if isinstance(ev, ReplyAudio):
            return time.monotonic() - start
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=6)
    args = ap.parse_args()
    cfg = Config.load()
    with console.status("cutting the questions, starting `moi serve`…"):
        clips = questions(args.questions)
        proc, url = start_server()
    rows, rt, ht = [], [], []
    try:
        engine = HttpEngine(RemoteConfig(url, read_timeout_s=120, first_byte_s=120))
        turn(engine, cfg, clips[0][1])  # warm-up, both paths
        asyncio.run(realtime(url, clips[0][1]))
        for i, (text, clip) in enumerate(clips, 1):
            with console.status(f"question {i}/{len(clips)}…"):
                decided, heard = asyncio.run(realtime(url, clip))
                posted = turn(engine, cfg, clip)
            rt.append(heard)
            ht.append(posted)
            rows.append([f"{i}. {text[:40]}", f"{decided:.2f} s", f"{heard:.2f} s", f"{posted:.2f} s",
                         f"{heard - posted:+.2f} s"])
        engine.close()
    finally:
        proc.kill()
        proc.wait()
    rows.append(["median", "", f"{median(rt):.2f} s", f"{median(ht):.2f} s", f"{median(rt) - median(ht):+.2f} s"])
    show(f"End of speech → first reply audio, `moi serve` on loopback ({len(clips)} questions, defaults)",
         ["question", "realtime: turn decided", "realtime: first audio", "/v1/turn: first audio (oracle cut)",
          "realtime − turn"], rows,
         caption="realtime: the SDK's client streaming in real time, server VAD + Smart Turn · "
                 "/v1/turn: posted at the end of speech, no turn decision")


if __name__ == "__main__":
    main()
