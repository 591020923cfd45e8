"""Load on the gateway: 4, 8 and 16 concurrent clients on loopback, mixed requests.

A real `moi serve` (API key on) takes clients that each loop over a transcription of a 5 s
recording, a streamed chat (32 tokens) and a short speech, for a fixed time per level. Per
level: requests, served, told to retry (429 + Retry-After), errors (anything else), latency
p50 / p95 / max of served requests, the longest any request waited for an answer of any kind,
and the server's peak RSS. With the bounded queue per model, no request should wait past the
120 s limit: it is served or told to retry at once. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import SPEECH, console, show, start_server  # noqa: E402
from shared.audio import decode  # noqa: E402

KEY = "load-key"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(client: httpx.Client, kind: str, wav: bytes) -> int:
    if kind == "transcription":
        return client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", wav, "audio/wav")},
                           data={"model": "whisper-1"}).status_code
    if kind == "chat":
        body = {"messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 32, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            for _ in r.iter_bytes():
                pass
            return r.status_code
    with client.stream("POST", "/v1/audio/speech", json={"input": "The weather is lovely today.", "voice": "alloy"}) as r:
        for _ in r.iter_bytes():
            pass
        return r.status_code


def level(url: str, clients: int, seconds: float, wav: bytes) -> dict:
    results: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(i: int) -> None:
        kinds = itertools.cycle(["chat", "transcription", "speech"][i % 3 :] + ["chat", "transcription", "speech"][: i % 3])
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as client:
            while time.monotonic() < stop_at:
                kind, started = next(kinds), time.monotonic()
                try:
                    code = request(client, kind, wav)
                except httpx.HTTPError:
                    code = -1
                with lock:
                    results.append((kind, code, time.monotonic() - started))
                if code == 429:
                    time.sleep(0.5)  # a polite client backs off (the header says how long)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    served = [t for _, code, t in results if code == 200]
    q = statistics.quantiles(served, n=20) if len(served) >= 2 else [float("nan")] * 19
    return {
        "requests": len(results),
        "served": len(served),
        "429": sum(code == 429 for _, code, _ in results),
        "errors": sum(code not in (200, 429) for _, code, _ in results),
        "p50": statistics.median(served) if served else float("nan"),
        "p95": q[18],
        "max_wait": max((t for _, _, t in results), default=float("nan")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="4,8,16")
    ap.add_argument("--seconds", type=float, default=45.0, help="per level")
    args = ap.parse_args()
    wav = decode(SPEECH).slice(0, 5).to_wav()
    with console.status("starting moi serve…"):
        proc, url = start_server("--api-key", KEY)
    rows = []
    try:
        for n in (int(x) for x in args.levels.split(",")):
            with console.status(f"{n} clients for {args.seconds:g} s…"):
                r = level(url, n, args.seconds, wav)
            rows.append([n, r["requests"], r["served"], r["429"], r["errors"], f"{r['p50']:.2f} s", f"{r['p95']:.2f} s",
                         f"{r['max_wait']:.1f} s", f"{peak_rss_mb(proc.pid):.0f} MB"])
    finally:
        proc.kill()
        proc.wait()
    show(
        "Gateway under load on loopback (moi serve, 2 cores): transcription · streamed chat · speech",
        ["clients", "requests", "served", "429", "errors", "p50 served", "p95 served", "longest wait", "peak RSS"],
        rows,
        caption="target: 0 errors, no wait past the 120 s limit (served, or 429 with Retry-After at once)",
    )


if __name__ == "__main__":
    main()
