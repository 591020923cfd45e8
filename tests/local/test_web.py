"""The web live view (`moi ui`) in real headless Chromium, driven by Playwright, over the real
models: the chat on the bundled sample streams, draws and plays, and Stop silences it; two
tabs share a session; a non-audio upload and a dropped WebSocket are handled.

Needs Debian's `chromium` (apt-get install chromium) and `pip install playwright`; the
browser Playwright would download is not used. A screenshot lands in tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import pytest

from cloud.engine import LocalEngine
from local.web import create_ui_app, run_ui
from shared.audio import Audio
from shared.config import Config
from shared.errors import ConfigError
from tests.conftest import serve, ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts"
CFG = Config.load(env={}, llm__max_tokens=40)
SLOW_MS = 300_000  # waits on the models: generous, the machine is shared with other heavy jobs

# Non-transparent pixels of a waveform canvas (bars only; the baseline is CSS, not pixels).
INK = """id => { const c = document.getElementById(id); if (!c.width) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
# What the reply's analyser hears now: the largest sample magnitude.
LOUDNESS = """() => { const p = moi.player; if (!p.analyser) return 0;
  const d = new Float32Array(p.analyser.fftSize); p.analyser.getFloatTimeDomainData(d);
  let m = 0; for (const x of d) m = Math.max(m, Math.abs(x)); return m; }"""


@pytest.fixture(scope="module")
def server(runners):
    app = create_ui_app(CFG, LocalEngine(CFG, runners))
    with serve(app, lifespan="on") as url:
        yield url, app.state.hub


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Chromium is not installed: `apt-get install chromium` (Debian's package; Playwright's download is not used)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: `pip install playwright`")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def open_page(browser, server):
    url, hub = server
    contexts, errors = [], []

    def open_() -> object:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.wait_for_function("() => window.moi && moi.hellos >= 1", timeout=30_000)
        return page

    yield open_
    for ctx in contexts:
        ctx.close()
    end_session(url, hub)
    assert not errors, f"uncaught errors in the page: {errors}"


def end_session(url: str, hub) -> None:
    """Leave the server idle for the next test (through the page protocol, as a page would)."""
    if hub.state == "idle":
        return
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws") + "/ws", open_timeout=20) as ws:
        ws.recv(timeout=20)  # hello
        ws.send(json.dumps({"cmd": "end"}))
        deadline = time.monotonic() + 60
        while hub.state != "idle" and time.monotonic() < deadline:
            time.sleep(0.1)
    assert hub.state == "idle"


def start(page, pipeline: str, source: str) -> None:
    """Pick and press Start; returns once every page shows the new session running (so what
    an earlier session left in the chat cannot be mistaken for this one's)."""
    page.select_option("#pipeline", pipeline)
    page.select_option("#input", source)
    before = page.evaluate("() => moi.sessions")
    page.click("#start")
    page.wait_for_function(f"() => moi.sessions > {before} && moi.state !== 'loading'", timeout=SLOW_MS)
    assert page.evaluate("() => moi.state") == "running", page.text_content("#error")


def chat_text(page, who: str) -> str:
    return page.evaluate(f"() => [...document.querySelectorAll('.msg.{who} .text')].map(e => e.textContent).join(' ')")


def test_chat_on_the_sample_streams_draws_plays_and_stops(open_page):
    page, other = open_page(), open_page()
    other.click("h1")  # a click lets a page play sound (autoplay policy)
    start(page, "chat", "sample")

    # The sample plays in real time: its speech shows before VAD and after, within the 30 s window.
    page.wait_for_function(f"() => ({INK})('wave-pre') > 200 && ({INK})('wave-post') > 200", timeout=SLOW_MS)
    page.wait_for_function("() => /dublin/i.test(document.querySelector('.msg.you .text')?.textContent || '')",
                           timeout=SLOW_MS)
    page.wait_for_function("() => (document.querySelector('.msg.moi .text')?.textContent || '').trim().length > 0",
                           timeout=SLOW_MS)  # reply tokens stream in
    page.wait_for_function("() => moi.player.playing", timeout=SLOW_MS)  # reply audio plays in the page
    other.wait_for_function("() => moi.player.playing", timeout=60_000)  # ...and in the other tab
    page.wait_for_function("() => moi.tracks.reply.values.filter(v => v > -60).length >= 4", timeout=30_000)

    assert "dublin" in chat_text(page, "you").lower() and chat_text(page, "moi").strip()
    assert page.evaluate("() => moi.audioFrames") >= 1
    assert page.evaluate(INK, "wave-reply") > 200  # the reply's waveform drew bars
    assert page.evaluate(LOUDNESS) > 0.001  # and the reply is audible through Web Audio
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)

    page.click("#stop")
    stopped = page.evaluate("() => ({playing: moi.player.playing, sources: moi.player.sources.size})")
    assert stopped == {"playing": False, "sources": 0}
    page.wait_for_timeout(300)
    assert page.evaluate(LOUDNESS) < 1e-4  # silence out of the analyser after Stop
    other.wait_for_function("() => !moi.player.playing", timeout=10_000)  # Stop reaches every tab
    assert other.evaluate(LOUDNESS) < 1e-4
    page.wait_for_function("() => /stopped by stop/.test(document.getElementById('chat').textContent)", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#timings tbody tr')", timeout=SLOW_MS)  # turn_done
    row = page.evaluate("() => [...document.querySelectorAll('#timings tbody tr:first-child td')].map(t => t.textContent)")
    assert row[0] == "1" and row[1] == "local" and row[4] != "–", row  # turn 1, engine, stt seconds
    assert 0.0 < float(row[2]) <= 1.5, row  # the silence waited before the turn's end was judged
    assert "local" in page.text_content("#engine")
    page.wait_for_timeout(1500)
    assert not page.evaluate("() => moi.player.playing")  # the stopped reply's tail never plays
    page.screenshot(path=str(ARTIFACTS / "web_chat_stopped.png"), full_page=True)


@pytest.fixture(scope="module")
def question(tmp_path_factory, speech60):
    """0.5 s of silence, then "and says, how do I get to Dublin?" (~2.2 s), then silence."""
    path = tmp_path_factory.mktemp("web") / "question.wav"
    Audio.concat([Audio.silence(0.5), speech60.slice(0.0, 2.3), Audio.silence(1.0)]).save_wav(path)
    return path


def test_two_tabs_share_one_session_started_on_an_upload(open_page, question):
    a, b = open_page(), open_page()
    for page in (a, b):
        page.wait_for_function("() => moi.clients === 2", timeout=30_000)
    assert "2 pages" in b.text_content("#conn")

    a.select_option("#input", "upload")
    a.set_input_files("#file", str(question))
    a.wait_for_function("() => moi.upload?.name === 'question.wav'", timeout=60_000)
    sessions = b.evaluate("() => moi.sessions")
    start(a, "vad", "upload")

    b.wait_for_function(f"() => moi.sessions > {sessions} && moi.state === 'running'", timeout=60_000)
    b.wait_for_function("() => /dublin/i.test(document.querySelector('.msg.you .text')?.textContent || '')",
                        timeout=SLOW_MS)  # the other tab sees the same session
    assert {"dublin", "get"} <= set(chat_text(b, "you").lower().strip("?.").split())
    assert not chat_text(b, "moi")  # transcribe only: no reply
    assert b.input_value("#pipeline") == "vad" and b.input_value("#input") == "upload"
    assert b.is_hidden("[data-panel=reply]") and b.is_visible("[data-panel=post]")
    assert b.evaluate(INK, "wave-post") > 50
    b.click("#end")
    a.wait_for_function("() => moi.state === 'idle'", timeout=60_000)


def test_the_microphone_through_the_page(open_page, question):
    from tests import pulse

    pulse.start()  # PulseAudio null sinks: a virtual microphone (see tests/pulse.py)
    page = open_page()
    start(page, "vad", "mic")
    page.wait_for_timeout(500)
    pulse.play(question).wait()
    page.wait_for_function("() => /dublin/i.test(document.querySelector('.msg.you .text')?.textContent || '')",
                           timeout=SLOW_MS)
    assert page.evaluate(INK, "wave-pre") > 50 and page.evaluate(INK, "wave-post") > 50
    assert page.is_hidden("[data-panel=aec]")  # no echo canceller runs: the reply plays in the page
    page.click("#end")
    page.wait_for_function("() => moi.state === 'idle'", timeout=60_000)


def test_with_the_speaker_the_page_shows_the_mic_after_echo_cancelling(browser, runners, question):
    """`moi ui --speaker --barge-in auto`: replies play on this machine, the echo canceller runs on the mic,
    and the page draws a third track, the microphone after it; its own playback is muted."""
    from tests import pulse

    pulse.start()
    app = create_ui_app(CFG, LocalEngine(CFG, runners), speaker=True, barge_in="auto")
    with serve(app, lifespan="on") as url:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = ctx.new_page()
            page.goto(url + "/")
            page.wait_for_function("() => window.moi && moi.hellos >= 1", timeout=30_000)
            assert page.evaluate("() => moi.player.muted")
            start(page, "vad", "mic")
            assert app.state.hub.session.echo is not None
            pulse.play(question).wait()
            page.wait_for_function("() => /dublin/i.test(document.querySelector('.msg.you .text')?.textContent || '')",
                                   timeout=SLOW_MS)
            assert page.is_visible("[data-panel=aec]")
            assert page.evaluate(INK, "wave-aec") > 50  # the question, still there after the canceller
            assert "--speaker" not in page.text_content("#chat")
        finally:
            end_session(url, app.state.hub)
            ctx.close()


def test_a_file_that_is_not_audio_is_refused_clearly(open_page, server, tmp_path):
    url, hub = server
    fake = tmp_path / "notes.wav"
    fake.write_text("these are my notes, not a recording\n")
    page = open_page()
    page.select_option("#input", "upload")
    page.set_input_files("#file", str(fake))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    message = page.text_content("#error")
    assert "notes.wav" in message and "not a readable audio file" in message, message
    page.click("#start")  # nothing to start on: the reason stays on screen, no session starts
    page.wait_for_timeout(500)
    assert page.is_visible("#error") and hub.state == "idle"

    r = httpx.post(url + "/api/upload", files={"file": ("notes.wav", b"not audio", "audio/wav")}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio"
    assert "not a readable audio file" in r.json()["error"]["message"]
    assert httpx.get(url + "/api/state", timeout=10).json()["state"] == "idle"  # still serving


def test_a_dropped_websocket_reconnects(open_page):
    page = open_page()
    page.wait_for_function("() => moi.connected && moi.ticks > 5", timeout=30_000)
    page.evaluate("() => moi.ws.close(4000, 'test drop')")
    page.wait_for_selector("#banner:not([hidden])", timeout=10_000)
    assert "reconnecting" in page.text_content("#banner")
    page.wait_for_function("() => moi.connections >= 2 && moi.connected && moi.hellos >= 2", timeout=30_000)
    ticks = page.evaluate("() => moi.ticks")
    page.wait_for_function(f"() => moi.ticks > {ticks} + 5", timeout=30_000)  # ticks flow again
    assert page.is_hidden("#banner")


def test_ticks_are_steady_in_silence_and_other_sites_are_refused(server):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url, _hub = server
    ws_url = url.replace("http", "ws") + "/ws"
    with connect(ws_url, open_timeout=20) as ws:
        hello = json.loads(ws.recv(timeout=20))
        assert hello["type"] == "hello" and {p["id"] for p in hello["pipelines"]} == {
            "transcribe", "meters", "vad", "echo", "chat"}
        start, ticks = time.monotonic(), 0
        while time.monotonic() - start < 2.0:
            msg = ws.recv(timeout=5)
            ticks += isinstance(msg, str) and json.loads(msg)["type"] == "tick"
    assert 20 <= ticks <= 45, ticks  # ~20 a second with nothing running (generous: shared CPU)

    with pytest.raises((InvalidStatus, ConnectionClosed)), connect(ws_url, origin="http://evil.example") as ws:
        ws.recv(timeout=10)


def test_a_busy_port_is_a_clear_error(server):
    port = int(server[0].rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"port {port} .* in use"):
        run_ui(CFG, host="127.0.0.1", port=port, preload=False)


# --- DNS rebinding and uploads: the Gate in front of the view -----------------------------


@pytest.fixture(scope="module")
def guarded(runners):
    """The view's app with a 1 MB upload limit, driven in-process (no lifespan: no session runs)."""
    from starlette.testclient import TestClient

    return TestClient(create_ui_app(CFG, LocalEngine(CFG, runners), max_upload_mb=1), base_url="http://127.0.0.1:8080")


def test_a_rebinding_page_cannot_reach_the_view(guarded):
    """A page on a rebinding domain sends Host and Origin both rebind.example: refused on every
    route and on the WebSocket, so it can never drive the session or open the microphone."""
    from starlette.websockets import WebSocketDisconnect

    evil = {"host": "rebind.example:8080", "origin": "http://rebind.example:8080"}
    for path in ("/", "/api/state"):
        r = guarded.get(path, headers=evil)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", r.text
    assert guarded.post("/api/upload", headers=evil, files={"file": ("a.wav", b"RIFF")}).status_code == 403
    with pytest.raises(WebSocketDisconnect) as closed, guarded.websocket_connect("/ws", headers=evil) as ws:
        ws.receive_text()
    assert closed.value.code == 1008
    assert guarded.get("/api/state", headers={"host": "localhost:8080"}).status_code == 200  # loopback names pass


def test_uploads_need_this_origin_and_stop_at_the_limit(guarded, speech60):
    other_site = {"origin": "http://evil.example"}
    wav = speech60.slice(0, 2).to_wav()
    r = guarded.post("/api/upload", headers=other_site, files={"file": ("a.wav", wav, "audio/wav")})
    assert r.status_code == 403
    r = guarded.post("/api/upload", headers={"origin": "http://127.0.0.1:8080"}, files={"file": ("a.wav", wav, "audio/wav")})
    assert r.status_code == 200 and r.json()["seconds"] == pytest.approx(2.0, abs=0.01)
    # 8 MB in 64 kB chunks with no Content-Length, straight into the ASGI app: it must stop
    # reading near the 1 MB limit and answer 413 (TestClient would buffer the body first).
    chunks, sent = [0], []

    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'

    async def receive():
        chunks[0] += 1
        return {"type": "http.request", "body": (head if chunks[0] == 1 else b"") + b"x" * 65536,
                "more_body": chunks[0] < 128}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api/upload", "raw_path": b"/api/upload", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"multipart/form-data; boundary=b")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }
    # On a thread of its own: Playwright's sync API, open for the module's browser tests, leaves
    # an event loop running on this one, and asyncio.run refuses to nest inside it.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, guarded.app(scope, receive, send)).result(timeout=60)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert start["status"] == 413 and body["error"]["code"] == "file_too_large"
    assert chunks[0] <= 18, chunks[0]  # 1 MB + a chunk: cut at the limit, not after reading 8 MB


def test_a_decompression_bomb_upload_is_refused_before_it_is_decoded(runners, bombs):
    """3 h of silence in 2 MB: over the view's 30 min, said at once, never decoded whole."""
    from starlette.testclient import TestClient

    client = TestClient(create_ui_app(CFG, LocalEngine(CFG, runners), max_upload_mb=5), base_url="http://127.0.0.1:8080")
    for kind in ("declared", "undeclared"):
        started = time.monotonic()
        r = client.post("/api/upload", files={"file": ("bomb.flac", bombs[kind], "audio/flac")})
        assert r.status_code == 400 and "the limit is 1800 s" in r.json()["error"]["message"], r.text
        assert time.monotonic() - started < 20
