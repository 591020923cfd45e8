"""The ``/v1/turn`` wire format: a stream of frames, each a JSON header plus a binary payload.

Wyoming's idea, length-prefixed so a reader never scans for delimiters::

    [4-byte big-endian N] [N bytes: UTF-8 JSON header] [header["payload_length"] bytes: payload]

Audio travels as raw PCM16 in the payload (never base64) and its header says its format
(``{"type": "audio", "sample_rate": 24000, "format": "pcm16", ...}``). The server writes with
:func:`encode_frame`; a client feeds whatever byte chunks the network gives it to a
:class:`FrameReader` and gets whole frames back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from shared.errors import EngineError

_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes; more means a broken stream
MAX_PAYLOAD_BYTES = 64 << 20  # one sentence of PCM16 is well under a megabyte

Frame = tuple[dict[str, Any], bytes]


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One frame: ``header`` (with ``payload_length`` set) as JSON, then ``payload``."""
    body = json.dumps({**header, "payload_length": len(payload)}, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body + payload


class FrameReader:
    """Incremental decoder: ``feed`` byte chunks of any size, get back the complete frames."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: dict[str, Any] | None = None  # parsed, waiting for its payload

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            if self._header is None:
                if len(self._buf) < _LENGTH.size:
                    return frames
                (size,) = _LENGTH.unpack_from(self._buf)
                if size > MAX_HEADER_BYTES:
                    raise EngineError(f"turn stream: a {size}-byte frame header is not plausible")
                if len(self._buf) < _LENGTH.size + size:
                    return frames
                self._header = _parse_header(bytes(self._buf[_LENGTH.size : _LENGTH.size + size]))
                del self._buf[: _LENGTH.size + size]
            need = self._header.get("payload_length", 0)
            if len(self._buf) < need:
                return frames
            frames.append((self._header, bytes(self._buf[:need])))
            del self._buf[:need]
            self._header = None

    def close(self) -> None:
        """Call at the end of the stream: raises if it stopped in the middle of a frame."""
        if self._buf or self._header is not None:
            raise EngineError("turn stream ended in the middle of a frame (connection cut?)")


def read_frames(chunks: Iterable[bytes]) -> Iterator[Frame]:
    """Frames from an iterable of byte chunks (e.g. ``httpx.Response.iter_bytes()``)."""
    reader = FrameReader()
    for chunk in chunks:
        yield from reader.feed(chunk)
    reader.close()


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"turn stream: a frame header is not UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise EngineError(f"turn stream: a frame header must be a JSON object, got {type(header).__name__}")
    length = header.get("payload_length", 0)
    if not isinstance(length, int) or not 0 <= length <= MAX_PAYLOAD_BYTES:
        raise EngineError(f"turn stream: bad payload_length {length!r}")
    return header


__all__ = ["Frame", "FrameReader", "encode_frame", "read_frames"]
