"""What a batch writes to disk: transcripts as txt / srt / vtt / json, atomically, and its manifest.

Every file is written to a hidden temp file in its own folder (``.NAME.PID.moi-tmp``), then
moved over the real name with ``os.replace``: a reader (or a run killed with ``kill -9``) sees
either the old file or the new one, never half of one. :func:`clean_stale_temps` removes the
temp files a killed run left behind (those whose process is gone).

A transcript is the JSON-ready dict :func:`local.batch.transcribe_one` returns: ``language``,
``duration``, ``model``, ``text`` and ``segments`` (``start``, ``end``, ``text``, ``words``),
times in seconds on the file's clock.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shared.text import timestamp

FORMATS = ("txt", "srt", "vtt", "json")
TEMP_SUFFIX = ".moi-tmp"
MANIFEST_NAME = "moi-manifest.json"


# --- formats ----------------------------------------------------------------------------------


def _cues(result: Mapping[str, Any]) -> list[tuple[float, float, str]]:
    """(start, end, text) per segment with text; an end never before its start."""
    out = []
    for seg in result.get("segments", ()):
        text = " ".join(seg["text"].split())
        if text:
            out.append((seg["start"], max(seg["end"], seg["start"] + 0.001), text))
    return out


def to_txt(result: Mapping[str, Any]) -> str:
    """One line per segment, no timestamps (Whisper's own .txt)."""
    return "".join(f"{text}\n" for _, _, text in _cues(result))


def to_srt(result: Mapping[str, Any]) -> str:
    blocks = [
        f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text}\n"
        for i, (a, b, text) in enumerate(_cues(result), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(result: Mapping[str, Any]) -> str:
    blocks = [
        f"{timestamp(a, '.')} --> {timestamp(b, '.')}\n{text.replace('-->', '->')}\n" for a, b, text in _cues(result)
    ]
    return "\n".join(["WEBVTT\n", *blocks])


def to_json(result: Mapping[str, Any]) -> str:
    keep = ("source", "language", "duration", "model", "text", "segments")
    return json.dumps({k: result[k] for k in keep if k in result}, ensure_ascii=False, indent=1) + "\n"


RENDER = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json}


def parse_formats(spec: str) -> tuple[str, ...]:
    """``"txt,srt"`` → ``("txt", "srt")``; ``"all"`` → every format. Raises ValueError."""
    names = [f.strip().lower().lstrip(".") for f in spec.split(",") if f.strip()]
    if names == ["all"]:
        return FORMATS
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown format {', '.join(unknown) or repr(spec)}: choose from {','.join(FORMATS)} or all")
    return tuple(dict.fromkeys(names))


# --- atomic files -----------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a hidden temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(folders: Iterable[Path]) -> list[Path]:
    """Remove temp files of runs that no longer exist (killed mid-write); returns what went."""
    removed = []
    for folder in set(folders):
        if not folder.is_dir():
            continue
        for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
            pid = tmp.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue  # a run still writing here
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# --- the manifest ------------------------------------------------------------------------------


class Manifest:
    """``moi-manifest.json``: one entry per input file, rewritten atomically as files finish.

    Entries of earlier runs are kept (a later run over a subset updates only its files);
    ``transcriptions`` counts how many times moi transcribed a file into this folder over all
    runs, so a resumed batch can be checked for work done twice. Rewrites are throttled so that
    they cost at most ~5% of the run on very large batches; :meth:`save` forces one.
    """

    def __init__(self, path: Path, meta: Mapping[str, Any]) -> None:
        self.path = path
        self.meta = dict(meta)
        self.files: dict[str, dict[str, Any]] = {}
        self._cost = 0.0
        self._last = 0.0
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(old, dict) and isinstance(old.get("files"), dict):
                    self.files = old["files"]
            except (OSError, ValueError):
                self.files = {}  # unreadable: start afresh, the outputs themselves say what is done

    def previous(self, key: str) -> dict[str, Any]:
        return self.files.get(key, {})

    def record(self, key: str, entry: Mapping[str, Any]) -> None:
        self.files[key] = {**entry, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if time.monotonic() - self._last >= 20 * self._cost:
            self.save()

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {"done": 0, "skipped": 0, "failed": 0}
        for e in self.files.values():
            out[e["status"]] = out.get(e["status"], 0) + 1
        out["audio_s"] = round(sum(e.get("duration_s") or 0.0 for e in self.files.values()), 3)
        return out

    def save(self) -> None:
        t = time.monotonic()
        body = {"version": 1, **self.meta, "totals": self.totals(), "files": dict(sorted(self.files.items()))}
        write_atomic(self.path, json.dumps(body, ensure_ascii=False, indent=1) + "\n")
        self._last = time.monotonic()
        self._cost = self._last - t
