"""One config object: a frozen dataclass per component, composed once at the entry point.

Precedence: defaults < environment (``MOI_<SECTION>_<FIELD>``, e.g. ``MOI_LLM_MAX_TOKENS=64``)
< explicit overrides (the CLI). Nothing here writes to ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import ConfigError

#: The name `modal deploy modal_app.py` deploys under; the laptop looks its functions up by it.
MODAL_APP = "moi"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def model_threads(n: int) -> int:
    """Threads for llama.cpp and Whisper on the CPU: ``n``, or for 0 half the cores, at least
    one. With every core, one other busy program slows a turn the most (on 2 cores, first audio
    2.28 s with one core busy vs 1.88 s on one thread each; 1.53 and 1.55 s when idle:
    bench/voice_to_voice.py)."""
    return n if n > 0 else max(1, cpu_cores() // 2)


def single_thread_blas() -> None:
    """numpy's OpenBLAS on one thread, for the whole process. Its worker thread spins ~0.1 s
    after every product it shares (the 3 ms mel filterbank of Whisper's and Smart Turn's
    features), and on a small CPU that spinning takes a core from the encoder that runs right
    after: Whisper on a 3 s utterance 257-268 ms instead of 291-297 on 2 cores. Nothing in moi
    needs a parallel BLAS. Other BLAS libraries (torch's) are left alone."""
    from threadpoolctl import ThreadpoolController

    ThreadpoolController().select(internal_api="openblas").limit(limits=1)


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5  # speech starts when the probability reaches this
    # ...or this, while moi's voice plays into an echo-cancelled microphone: the canceller holds
    # a person talking over moi down for their first 0.1-0.4 s, and Silero's probability on what
    # is left rises late (moi's own echo that gets through is judged by the canceller: local.echo)
    over_reply_threshold: float = 0.4
    release: float = 0.35  # ...and counts as silence again only below this (hysteresis)
    min_speech_ms: int = 250  # shorter blips are dropped
    silence_ms: int = 500  # silence tolerated inside an utterance before it ends
    pre_roll_ms: int = 300  # audio kept before the detected start (word onsets)
    post_roll_ms: int = 200  # audio kept after the last speech window (word ends)
    max_utterance_s: float = 20.0  # longer speech is flushed as an utterance at this length
    model: str = "auto"
    # End of turn (cloud/turn_end.py): after turn_silence_ms of silence the turn-end model is
    # asked whether the person has finished; at turn_threshold or above the turn ends there,
    # else it is asked again at silence_ms, and a second no waits up to turn_max_silence_ms.
    # Without the model: silence_ms, as above.
    turn_model: str = "auto"  # auto: Smart Turn if installed, else silence only · off · a spec
    turn_silence_ms: int = 200
    turn_threshold: float = 0.5
    turn_max_silence_ms: int = 1000
    # Speculation: after speculate_ms of silence the turn is started before it is decided (live
    # only; its events wait until the turn ends there, and it is dropped if the person goes on).
    # 0: off.
    speculate_ms: int = 96


@dataclass(frozen=True)
class SttConfig:
    model: str = "auto"  # path, pack name, hub id or faster-whisper size; see shared.models
    device: str = "auto"  # cpu | cuda | auto
    compute_type: str = "auto"  # int8 on CPU, float16 on CUDA when auto
    language: str | None = None
    beam_size: int = 5
    word_timestamps: bool = False
    initial_prompt: str | None = None  # hotwords / spelling hints, e.g. "ComfyUI"
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    min_rms_db: float = -55.0  # quieter audio is not sent to Whisper at all
    # CTranslate2's threads on the CPU; 0: half the cores (model_threads). On 2 cores one thread
    # transcribes a 3 s utterance in 431 ms against 489 ms on two and 492 ms on CTranslate2's
    # default (4), and a 9 s one in 422 against 453 and 456 ms.
    cpu_threads: int = 0
    # Whisper's encoder reads a 30 s window however short the utterance. Here it is given the
    # utterance plus window_margin_s, at least window_s (0: always 30 s, Whisper's own); the
    # encoder's time falls with the window (bench/stt.py). A window that short makes Whisper
    # loop or hear nothing now and then, so such a result is redone on the full 30 s window.
    window_s: float = 10.0
    window_margin_s: float = 5.0


@dataclass(frozen=True)
class LlmConfig:
    model: str = "auto"
    backend: str = "auto"  # llama_cpp | transformers | auto (llama.cpp for GGUF, else transformers)
    system_prompt: str = (
        "You are moi, a friendly voice assistant. Answer in one or two short spoken sentences."
    )
    max_tokens: int = 64
    temperature: float = 0.0
    repeat_penalty: float = 1.2  # the 135M model loops ("You can't miss it." ×8) without it
    max_turns: int = 6  # user+assistant pairs kept in the thread
    context: int = 2048
    threads: int = 0  # 0: half the cores (model_threads)
    # llama.cpp: keep the KV cache of the prompt prefix the last turn shared (a follow-up turn
    # then evaluates only its new tokens: ~1 s less on a long thread on 2 cores). Off: every
    # prompt is evaluated whole, so the same thread always gives the same greedy reply.
    reuse_prefix: bool = True
    # Never repeat this many tokens in a row of an earlier reply (0: off). The repeat penalty sees
    # only this reply's tokens, so without it a follow-up that is not a question ("Tell me more.")
    # gets the last answer again, word for word (see cloud.chat.RepeatGuard).
    no_repeat_ngram: int = 4
    seed: int = 0
    # transformers: one fixed-size KV cache reused for every reply, so the decode step compiles
    # once into CUDA graphs (auto: on CUDA; on: also on the CPU, where it only saves allocations)
    static_cache: str = "auto"


@dataclass(frozen=True)
class TtsConfig:
    model: str = "auto"
    backend: str = "auto"  # onnx | torch | piper | auto (the one the resolved model's format needs)
    voice: str = "auto"  # af_heart from the hub; joe from Piper's offline pack, jf_alpha from Kokoro's
    speed: float = 1.0
    lang: str = "en-us"
    first_clause_chars: int = 24  # speak the first clause early when a sentence is longer
    first_words: int = 4  # ...or, with no clause break, its first words (0: never cut mid-clause)
    # a longer sentence is cut at its clause breaks (0: never): a Stop or a barge-in waits for
    # the piece being synthesized, and with it the person's next turn
    max_piece_chars: int = 80
    threads: int = 0  # onnxruntime threads for Kokoro ONNX or Piper; 0: every core (they sleep when idle)


@dataclass(frozen=True)
class Config:
    vad: VadConfig = field(default_factory=VadConfig)
    stt: SttConfig = field(default_factory=SttConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    tick_ms: int = 50  # meter tick period
    echo_canceller: str = "auto"  # auto (the first installed of local.echo's) | pywebrtc | livekit | speex | off
    echo_record: str = ""  # a folder: the canceller's input and output are kept there (bench/echo_replay.py)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then ``MOI_*`` variables from ``env``, then ``overrides``.

        ``overrides`` uses ``section__field`` keys (``llm__max_tokens=32``) or top-level names.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            section_cls = _section_types().get(f.name)
            if section_cls is not None:
                sec = {}
                for sf in dataclasses.fields(section_cls):
                    key = f"MOI_{f.name}_{sf.name}".upper()
                    if key in env:
                        sec[sf.name] = _coerce(section_cls, sf, env[key], key)
                    ov = overrides.pop(f"{f.name}__{sf.name}", None)
                    if ov is not None:
                        sec[sf.name] = ov
                values[f.name] = section_cls(**sec)
            else:
                key = f"MOI_{f.name}".upper()
                if key in env:
                    values[f.name] = _coerce(cls, f, env[key], key)
                if f.name in overrides and overrides[f.name] is not None:
                    values[f.name] = overrides.pop(f.name)
                else:
                    overrides.pop(f.name, None)
        unknown = [k for k, v in overrides.items() if v is not None]
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(sorted(unknown))}")
        return cls(**values)


def _section_types() -> dict[str, type]:
    return {"vad": VadConfig, "stt": SttConfig, "llm": LlmConfig, "tts": TtsConfig}


def _coerce(owner: type, f: dataclasses.Field, raw: str, key: str) -> Any:
    hint = typing.get_type_hints(owner)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if raw.strip().lower() in ("", "none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return hint(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {hint.__name__}") from None
