"""The `moi` command line.

    moi --local --input FILE [--pipeline transcribe|echo|chat] [--save-reply OUT.wav] [--json]
    moi models [--download]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from local import SAMPLE
from shared.config import Config
from shared.engine import Engine
from shared.errors import MoiError


app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="moi: a voice assistant of four small open models (Silero VAD, Whisper, SmolLM2, Piper or Kokoro).",
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False)


# Options that `moi` and `moi ui` share.
LOCAL = typer.Option(
    True, "--local/--remote", help="Models in this process (offline), or on a gateway (--url) with local fallback."
)
URL = typer.Option(
    None, "--url", envvar="MOI_REMOTE_URL", help="--remote: gateway URL (Modal, `moi serve`), or 'modal' for the SDK."
)
API_KEY = typer.Option(None, "--api-key", envvar="MOI_API_KEY", help="--remote: bearer key.")
FALLBACK = typer.Option(True, "--fallback/--no-fallback", help="--remote: answer locally when the remote fails.")
BARGE_IN = typer.Option(
    "auto", "--barge-in",
    help="auto: an echo canceller on the mic, and speech over a reply cuts in (laptop speakers; acts as half "
         "without a canceller, and says so); half: ignore the mic while moi speaks; full: speech cuts in (headset).",
)


def _register_commands() -> None:
    from local.batch_cli import register as register_transcribe

    register_transcribe(app)  # `moi transcribe PATH...`


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]moi: error:[/] {escape(message)}", soft_wrap=True)  # library text is not markup
    return typer.Exit(code)


def _check_echo(cfg: Config) -> None:
    """A MOI_ECHO_CANCELLER that names no canceller fails before any model loads."""
    from local.echo import check

    check(cfg.echo_canceller)


def _input_path(spec: str) -> Path:
    return SAMPLE if spec == "sample" else Path(spec)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    local: bool = LOCAL,
    url: Optional[str] = URL,
    api_key: Optional[str] = API_KEY,
    fallback: bool = FALLBACK,
    input: str = typer.Option("mic", "--input", "-i", help="mic, an audio file, or 'sample' (bundled)."),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="speaker or FILE.wav (default: speaker for mic input, none for files)."
    ),
    input_device: Optional[str] = typer.Option(None, "--input-device", help="Input device index or name."),
    output_device: Optional[str] = typer.Option(None, "--output-device", help="Output device index or name."),
    barge_in: str = BARGE_IN,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only you:/moi: lines, no live view."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Stop listening to the mic after this long."),
    pipeline: str = typer.Option("chat", "--pipeline", "-p", help="transcribe | echo | chat"),
    save_reply: Optional[Path] = typer.Option(None, "--save-reply", help="Write the spoken reply to this WAV."),
    as_json: bool = typer.Option(False, "--json", help="One JSON event per line on stdout."),
    meters: bool = typer.Option(True, "--meters/--no-meters", help="Include meter ticks in --json output."),
    voice: Optional[str] = typer.Option(None, "--voice", help="Voice by name: `moi models` lists the installed ones."),
    tts: Optional[str] = typer.Option(
        None, "--tts", help="Voice model: piper-joe (default offline), kokoro-int8 (~9x slower on a CPU), a path or hub id."
    ),
    language: Optional[str] = typer.Option(None, "--language", help="Spoken language (Whisper code)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Longest reply in tokens."),
    llm_backend: Optional[str] = typer.Option(None, "--llm-backend", help="llama_cpp | transformers | auto"),
) -> None:
    """Listen to INPUT, cut it into utterances, and answer each one."""
    if ctx.invoked_subcommand is not None:
        return
    from local.run import run_file, run_live

    try:
        cfg = Config.load(
            stt__language=language, tts__voice=voice, tts__model=tts, llm__max_tokens=max_tokens,
            llm__backend=llm_backend,
        )
        _check_echo(cfg)
        if output not in (None, "speaker") and not output.lower().endswith(".wav"):
            raise MoiError(f"--output takes 'speaker' or a .wav path, not {output!r}")
        if output not in (None, "speaker"):
            save_reply = Path(output)
        engine = None if local else _remote_engine(cfg, url, api_key, fallback)
        live = input == "mic" or output == "speaker"
        if not live:
            code = run_file(
                _input_path(input), cfg, variant=pipeline, save_reply=save_reply, as_json=as_json, meters=meters,
                engine=engine,
            )
        else:
            from local.audio_io import MicSource, Player
            from cloud.pipeline import file_source
            from local.run import paced

            if input == "mic":
                source = MicSource(input_device, max_s=seconds).start()
            else:
                decode_check = _input_path(input)
                source = paced(file_source(decode_check))
            player = Player(output_device) if output in (None, "speaker") else None
            mode = "json" if as_json else "quiet" if quiet else "view"
            code = run_live(
                cfg, source, player, variant=pipeline, barge_in=barge_in, mode=mode, save_reply=save_reply,
                engine=engine, hears_player=input == "mic",
            )
    except MoiError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def models(
    download: bool = typer.Option(False, "--download", help="Fetch hub models into the local cache."),
    vad: Optional[str] = typer.Option(None, "--vad", help="Spec for the vad role (default: config)."),
    stt: Optional[str] = typer.Option(None, "--stt", help="Spec for stt: path, pack alias, size or hub id."),
    llm: Optional[str] = typer.Option(None, "--llm", help="Spec for llm: path, pack alias or hub id."),
    tts: Optional[str] = typer.Option(None, "--tts", help="Spec for tts: path, pack alias or hub id."),
    turn: Optional[str] = typer.Option(None, "--turn", help="Spec for the end-of-turn model: path, pack alias or hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List each role's resolved model (source, path, size); --download pre-fetches hub models.

    With --download, `auto` roles fetch their production hub default (the weights Modal bakes
    into its images) so later runs work offline.
    """
    from shared.models import HUB_DEFAULTS, ROLES, describe, resolve

    cfg = Config.load()
    given = {"vad": vad, "stt": stt, "llm": llm, "tts": tts, "turn": turn}
    configured = {"vad": cfg.vad.model, "stt": cfg.stt.model, "llm": cfg.llm.model, "tts": cfg.tts.model,
                  "turn": cfg.vad.turn_model}
    specs = {role: given[role] or configured[role] for role in ROLES}
    if specs["turn"] == "off":
        del specs["turn"]  # switched off (MOI_VAD_TURN_MODEL=off): nothing to resolve
    if download:
        specs = {r: HUB_DEFAULTS.get(r, s) if s == "auto" else s for r, s in specs.items()}
    rows, missing = [], 0
    for role in specs:
        try:
            with err.status(f"resolving {role} ({specs[role]})…"):
                rows.append(describe(resolve(role, specs[role], download=download)))
        except MoiError as exc:
            missing += 1
            rows.append({"role": role, "error": str(exc)})
        except OSError as exc:  # network errors from the hub client
            missing += 1
            rows.append({"role": role, "error": f"download of {specs[role]} failed: {_first_line(exc)}"})
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table("role", "model", "source", "format", "size")
        for column in table.columns:
            column.overflow = "fold"  # wrapped onto the next line, never cut to "…"
        for r in rows:
            if "error" in r:
                table.add_row(r["role"], f"[red]{escape(r['error'])}[/]", "", "", "")
            else:
                table.add_row(r["role"], escape(r["name"]), escape(r["source"]), r["format"], f"{r['size_mb']} MB")
        out = Console()
        out.print(table)
        for r in rows:  # whole paths, one a line, for copying (the terminal wraps them, nothing cuts them)
            if "path" in r:
                out.print(f"{r['role']}: {escape(r['path'])}", soft_wrap=True, highlight=False)
        for r in rows:
            if r.get("voices"):
                out.print(f"tts voices (--voice, MOI_TTS_VOICE): {', '.join(r['voices'])}", soft_wrap=True)
    raise typer.Exit(1 if missing else 0)


def _remote_engine(cfg: Config, url: str | None, api_key: str | None, fallback: bool) -> Engine:
    """The engine for --remote: HTTP to a gateway (one request per turn), local fallback unless
    --no-fallback. ``--url modal`` finds the deployed Modal gateway's URL by name."""
    from cloud.engine import LocalEngine
    from local.remote import FallbackEngine, HttpEngine, RemoteConfig

    if not url:
        raise MoiError("--remote needs a gateway: --url URL (or MOI_REMOTE_URL), or --url modal")
    if url == "modal":
        from local.deployed import gateway_url

        url = gateway_url("--url modal")
    elif not url.startswith(("http://", "https://")):
        raise MoiError(f"--url must be http(s)://… or 'modal', not {url!r}")
    primary = HttpEngine(RemoteConfig(url, api_key))
    return FallbackEngine(primary, LocalEngine(cfg)) if fallback else primary


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOI_API_KEY", help="Require this bearer key."),
    preload: bool = typer.Option(True, "--preload/--lazy", help="Load the models before accepting requests."),
) -> None:
    """Serve the OpenAI-compatible gateway over the in-process models (a home GPU box, a laptop)."""
    import uvicorn

    from cloud.engine import LocalEngine
    from cloud.http import create_app

    try:
        cfg = Config.load()
        engine = LocalEngine(cfg)
        if preload:
            with err.status("loading stt, llm, tts models…"):
                engine.warm()
    except MoiError as exc:
        raise fail(str(exc)) from None
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        err.print("[yellow]warning:[/] serving beyond loopback with no --api-key: anyone who can reach it can use it")
    uvicorn.run(create_app(engine, api_key=api_key, cfg=cfg), host=host, port=port, log_level="info")


@app.command()
def ui(
    local: bool = LOCAL,
    url: Optional[str] = URL,
    api_key: Optional[str] = API_KEY,
    fallback: bool = FALLBACK,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (the page can start your microphone)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    input_device: Optional[str] = typer.Option(None, "--input-device", help="Microphone for the page's mic input."),
    barge_in: str = BARGE_IN,
    preload: bool = typer.Option(True, "--preload/--lazy", help="Load the models before serving the page."),
    speaker: bool = typer.Option(
        False, "--speaker/--page", help="Play replies on this machine's speaker (echo-cancelled mic), or in the page."
    ),
    output_device: Optional[str] = typer.Option(None, "--output-device", help="--speaker: output device index or name."),
) -> None:
    """Serve the web live view: waveforms before/after VAD (and after echo cancelling) and of
    the reply, the chat, per-turn timings, the engine that answered, and a Stop button. The
    reply plays in the browser, or with --speaker on this machine (then speech over it cuts in)."""
    from local.web import run_ui

    try:
        cfg = Config.load()
        _check_echo(cfg)
        engine = None if local else _remote_engine(cfg, url, api_key, fallback)
        run_ui(cfg, engine, host=host, port=port, preload=preload, barge_in=barge_in, input_device=input_device,
               speaker=speaker, output_device=output_device)
    except MoiError as exc:
        raise fail(str(exc)) from None


@app.command()
def devices() -> None:
    """List audio devices with their channels and default rates (* marks the defaults)."""
    from local.audio_io import list_devices

    try:
        found = list_devices()
    except MoiError as exc:
        raise fail(str(exc)) from None
    table = Table("#", "name", "in", "out", "default rate", "default")
    for d in found:
        mark = " ".join(m for m, on in (("input", d.is_default_input), ("output", d.is_default_output)) if on)
        table.add_row(str(d.index), d.name, str(d.inputs), str(d.outputs), f"{d.default_rate:.0f} Hz", mark)
    Console().print(table)
    if not found:
        raise fail("no audio devices found (is PortAudio able to see a sound server?)", 1)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_register_commands()


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    run()
