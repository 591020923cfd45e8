"""OpenAI's shapes on the wire: error bodies, transcription formats, chat chunks, streamed WAV.

Pure functions over :mod:`shared.messages` types, so the HTTP app (:mod:`cloud.http`) stays
about routing and threads.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException

from shared.engine import TurnRequest
from shared.messages import ChatOptions, Message, Transcription
from shared.text import timestamp

_DEFAULTS = ChatOptions()

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
SpeechFormat = Literal["wav", "pcm", "mp3", "opus", "aac", "flac"]  # the last four: shared.audio.ENCODINGS
SPEECH_FORMATS: tuple[str, ...] = get_args(SpeechFormat)

#: OpenAI's voices → their closest Kokoro voice, and whether it is a female (f) or male (m)
#: voice; where the twin is not installed, the first installed voice of the same kind answers.
OPENAI_VOICES: dict[str, tuple[str, str]] = {
    "alloy": ("af_alloy", "f"), "ash": ("am_adam", "m"), "ballad": ("bm_george", "m"),
    "coral": ("af_heart", "f"), "echo": ("am_echo", "m"), "fable": ("bm_fable", "m"),
    "nova": ("af_nova", "f"), "onyx": ("am_onyx", "m"), "sage": ("af_sarah", "f"),
    "shimmer": ("af_bella", "f"), "verse": ("am_michael", "m"), "marin": ("af_river", "f"),
    "cedar": ("am_eric", "m"),
}


def pick_voice(requested: str, installed: list[str]) -> str | None:
    """An installed voice for ``requested``: itself, or an OpenAI name's twin or kin; else None."""
    if requested in installed:
        return requested
    twin = OPENAI_VOICES.get(requested.lower())
    if twin is None:
        return None
    name, kind = twin
    if name in installed:
        return name
    # Kokoro names its voices <language><f|m>_<name>: jf_alpha is a female voice, jm_kumo a male
    # one. Other voices (Piper's "joe", "amy") say nothing of their kind: the first answers.
    kin = (v for v in installed if len(v) > 3 and v[2] == "_" and v[1] == kind)
    return next(kin, installed[0] if installed else None)
PCM_TYPES = frozenset({"audio/l16", "audio/pcm"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(HTTPException):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    A starlette ``HTTPException`` so FastAPI re-raises it untouched even from body parsing.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, headers)
        self.message = message
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- requests ------------------------------------------------------------------------------


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: An integer as JSON Schema means it: 3 and 3.0, never true or "3" (request bodies are strict).
JsonInt = Annotated[int, BeforeValidator(_whole)]
Tokens = Annotated[int, Field(ge=1, le=4096), BeforeValidator(_whole)]  # constraint first: JSON Schema sees it


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


def _text_part_schema(schema: dict[str, Any]) -> None:
    """What a client must send: a text part with its text (others are parsed to say why not)."""
    schema["required"] = ["type", "text"]
    schema["properties"]["text"] = {"type": "string", "title": "Text"}


class ContentPart(BaseModel):
    """A part of a message's content; only ``text`` parts are supported (others: a 400 that says so)."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_text_part_schema)
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str | None = None


class ChatMessage(BaseModel):
    """One OpenAI chat message; another role is a 400 that names the supported ones."""

    model_config = ConfigDict(extra="allow")
    role: str = Field(json_schema_extra={"enum": sorted(ROLES)})
    content: str | list[ContentPart] | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # `"seed": false` is not a seed
    model: str = "moi"
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: JsonInt | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=1), BeforeValidator(_whole)] = 1
    stream_options: dict[str, Any] | None = None


# --- what the OpenAPI document says of bodies FastAPI cannot see (multipart uploads) --------

_BINARY = {"type": "string", "format": "binary"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in (
        (400, "bad parameters, or a file that is not audio (or too long, or too large a conversation)"),
        (401, "missing or incorrect API key"),
        (413, "the request body is over the upload limit"),
        (429, "the model is busy: retry after the Retry-After header's seconds"),
        (500, "a server error (logged)"),
        (503, "a model is not installed on the server"),
        (504, "the answer (or a stream's next item) took longer than the time limit"),
    )
}


def transcription_upload() -> dict[str, Any]:
    fields = {
        "file": _BINARY,
        "model": {"type": "string"},
        "language": {"type": "string"},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": list(TRANSCRIPTION_FORMATS)},
        "temperature": {"type": "number"},
        "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["segment", "word"]}},
    }
    schema = {
        "type": "object",
        "required": ["file"],
        "properties": fields,
        # as at OpenAI: word or segment timestamps come only in verbose_json
        "dependentSchemas": {"timestamp_granularities[]": {
            "required": ["response_format"], "properties": {"response_format": {"const": "verbose_json"}}}},
    }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def turn_upload() -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": ["audio"],
        "properties": {"audio": _BINARY, "request": TurnBody.model_json_schema()},
    }
    encoding = {"request": {"contentType": "application/json"}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema, "encoding": encoding}}}}


class TurnBody(BaseModel):
    """The ``request`` part of a ``/v1/turn`` upload (JSON): the conversation so far (the system
    prompt first, once), the reply options, and the client's turn number."""

    model_config = ConfigDict(extra="ignore", strict=True)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    max_tokens: Tokens | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: JsonInt | None = None
    repeat_penalty: float | None = Field(None, ge=0.5, le=2.0)
    voice: str | None = None
    language: str | None = None
    variant: Literal["chat", "echo", "transcribe"] = "chat"
    turn: Annotated[int, Field(ge=0), BeforeValidator(_whole)] = 0

    @classmethod
    def of(cls, req: TurnRequest) -> TurnBody:
        """What a client sends for ``req`` (the one wire form of a turn's request, both ways)."""
        return cls(messages=[{"role": m.role, "content": m.content} for m in req.messages],
                   max_tokens=req.options.max_tokens, temperature=req.options.temperature, seed=req.options.seed,
                   repeat_penalty=req.options.repeat_penalty, voice=req.voice, language=req.language,
                   variant=req.variant, turn=req.turn)

    def request(self) -> TurnRequest:
        """The TurnRequest the server answers (defaults for what the client left out)."""
        options = chat_options(self.max_tokens, self.temperature, self.seed, self.repeat_penalty)
        messages = tuple(message_from_openai(i, m) for i, m in enumerate(self.messages))
        return TurnRequest(messages, options, self.variant, self.voice, self.language, self.turn)


class SpeechBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = "moi"
    input: str = Field(min_length=1, max_length=4096)
    voice: str | None = None  # None or "auto": the backend's default
    response_format: SpeechFormat = "wav"
    speed: float | None = Field(None, ge=0.25, le=4.0, description="OpenAI's range; Kokoro speaks 0.5-2.0 of it")
    stream_format: Literal["audio"] | None = None


def pcm_rate(content_type: str) -> int | None:
    """The rate of raw PCM (``audio/L16;rate=16000``, default 16000), or None for other types.

    moi's raw PCM is little-endian signed 16-bit mono, as :meth:`Audio.to_pcm16` writes it.
    """
    kind, *params = [p.strip().lower() for p in content_type.split(";")]
    if kind not in PCM_TYPES:
        return None
    opts = dict(p.split("=", 1) for p in params if "=" in p)
    if opts.get("channels", "1") != "1":
        raise ApiError(400, "raw PCM must be mono (channels=1)", param="audio")
    rate = opts.get("rate", "16000")
    if not rate.isdigit() or not 1000 <= int(rate) <= 192_000:
        raise ApiError(400, f"raw PCM rate {rate!r} is not a sample rate in Hz", param="audio")
    return int(rate)


# --- chat ----------------------------------------------------------------------------------


def chat_options(max_tokens: int | None, temperature: float | None, seed: int | None,
                 repeat_penalty: float | None = None, stop: tuple[str, ...] = ()) -> ChatOptions:
    """A request's reply options: what it set, the defaults for what it left out."""
    return ChatOptions(
        max_tokens=max_tokens or _DEFAULTS.max_tokens,
        temperature=_DEFAULTS.temperature if temperature is None else temperature,
        seed=_DEFAULTS.seed if seed is None else seed,
        repeat_penalty=_DEFAULTS.repeat_penalty if repeat_penalty is None else repeat_penalty,
        stop=stop,
    )


def message_from_openai(i: int, raw: dict[str, Any]) -> Message:
    """One OpenAI chat message (content a string or a list of text parts) as a :class:`Message`."""
    role = ROLES.get(str(raw.get("role")))
    if role is None:
        raise ApiError(
            400,
            f"messages[{i}].role {raw.get('role')!r} is not supported: use system, user or assistant",
            param=f"messages[{i}].role",
        )
    content = raw.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise ApiError(
                    400, f"messages[{i}].content[{j}]: a text part needs its `text`", param=f"messages[{i}].content[{j}]"
                )
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(
                    400,
                    f"messages[{i}].content[{j}] of type {kind!r} is not supported: only text parts",
                    param=f"messages[{i}].content[{j}]",
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(
            400,
            f"messages[{i}].content must be a string or a list of text parts",
            param=f"messages[{i}].content",
        )
    return Message(role, content)  # type: ignore[arg-type]  # narrowed by ROLES


def chat_chunk(
    cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def chat_completion(
    cid: str, created: int, model: str, text: str, finish: str, tokens: int
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage(tokens),
    }


def usage(completion_tokens: int) -> dict[str, int]:
    """Completion tokens are counted as streamed pieces; the prompt is not tokenized here."""
    return {"prompt_tokens": 0, "completion_tokens": completion_tokens, "total_tokens": completion_tokens}


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


# --- transcription -------------------------------------------------------------------------


def _cues(tr: Transcription) -> list[tuple[float, float, str]]:
    cues = []
    for seg in tr.segments:
        if not seg.text:
            continue
        start = max(seg.start, cues[-1][1] if cues else 0.0)  # cues never overlap or go back
        cues.append((start, max(seg.end, start + 0.001), seg.text))
    return cues


def to_srt(tr: Transcription) -> str:
    return "".join(
        f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text}\n\n"
        for i, (a, b, text) in enumerate(_cues(tr), 1)
    )


def to_vtt(tr: Transcription) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(a, '.')} --> {timestamp(b, '.')}\n{text}\n\n" for a, b, text in _cues(tr)
    )


def verbose_json(tr: Transcription, *, segments: bool = True, words: bool = False) -> dict[str, Any]:
    """OpenAI's ``verbose_json``; ``language`` is the ISO code Whisper detected or was given."""
    out: dict[str, Any] = {
        "task": "transcribe",
        "language": tr.language or "",
        "duration": round(tr.duration, 3),
        "text": tr.text,
    }
    if segments:
        out["segments"] = [
            {
                "id": i,
                "seek": 0,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for i, s in enumerate(tr.segments)
        ]
    if words:
        out["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in tr.segments
            for w in s.words
        ]
    return out


# --- speech --------------------------------------------------------------------------------


def wav_stream_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A WAV header for a stream of unknown length: RIFF and data sizes are 0xFFFFFFFF.

    Readers (FFmpeg, ``wave``, soundfile) take that as "read to the end of the stream".
    """
    block = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
        + b"data"
        + struct.pack("<I", 0xFFFFFFFF)
    )
