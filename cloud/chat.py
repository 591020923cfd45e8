"""Chat on SmolLM2-Instruct, token by token, with two backends behind one interface.

- ``llama_cpp``: llama.cpp on a GGUF file (the shipped Q4_1 offline; Metal on a Mac). The fast
  local path: the seed talk's own note was "try llama_cpp".
- ``transformers``: Hugging Face transformers on a hub checkout (the GPU path on Modal) or on
  the same GGUF (dequantized to fp32, slow on CPU but the same weights).

Both apply the chat template that ships with the model, take a system prompt and a thread,
honour ``max_tokens`` and ``temperature``, and stop between tokens when ``cancel`` is set.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from shared.config import LlmConfig, model_threads
from shared.errors import ConfigError, ContextTooLong, ModelNotFound
from shared.messages import ChatOptions, Message
from shared.models import ResolvedModel


class ChatBackend(Protocol):
    name: str
    device: str

    def stream(
        self, messages: Sequence[Message], options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]: ...


class RepeatGuard:
    """Bans the token that would make the reply repeat ``n`` tokens in a row of an earlier reply.

    Why: both backends' repeat penalty sees only the tokens generated in this call, never the
    earlier replies in the prompt, so at temperature 0 a small model answers a follow-up that is
    not a question ("Tell me more.", the rest of a sentence) by copying its last answer word for
    word. Blocking n-grams of earlier replies (``LlmConfig.no_repeat_ngram``; 0 = off) leaves
    fresh answers alone and makes such copies impossible.
    """

    def __init__(self, earlier: Sequence[Sequence[int]], n: int) -> None:
        self.n = n
        self.table: dict[tuple[int, ...], set[int]] = {}
        for toks in earlier:
            for i in range(len(toks) - n + 1):
                self.table.setdefault(tuple(toks[i : i + n - 1]), set()).add(toks[i + n - 1])

    def __bool__(self) -> bool:
        return bool(self.table)

    def banned(self, generated: Sequence[int]) -> set[int]:
        """Tokens that may not come next after ``generated`` (this reply's tokens so far)."""
        if len(generated) < self.n - 1:
            return set()
        return self.table.get(tuple(int(t) for t in generated[len(generated) - self.n + 1 :]), set())


class LlamaCppChat:
    name = "llama_cpp"
    device = "cpu"  # this wheel's build; Metal or CUDA builds offload layers on their own

    def __init__(self, model: ResolvedModel, cfg: LlmConfig = LlmConfig()) -> None:
        if model.format != "gguf":
            raise ConfigError(f"llama_cpp needs a .gguf model, {model.name} is {model.format}")
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelNotFound("the llama_cpp backend needs `pip install llama-cpp-python`") from exc
        self.model_info = model
        self.llm = Llama(
            model_path=str(model.path),
            n_ctx=cfg.context,
            n_threads=model_threads(cfg.threads),
            n_gpu_layers=-1,  # Metal/CUDA when the wheel has it; ignored on a CPU build
            seed=cfg.seed,
            verbose=False,
        )
        self.reuse_prefix = cfg.reuse_prefix
        self.no_repeat_ngram = cfg.no_repeat_ngram
        self._lock = threading.Lock()  # one llama context: one generation at a time

    def _guard(self, messages: Sequence[Message]):  # noqa: ANN202 - a llama_cpp LogitsProcessorList or None
        earlier = [m.content for m in messages if m.role == "assistant" and m.content]
        if not self.no_repeat_ngram or not earlier:
            return None
        from llama_cpp import LogitsProcessorList

        guard = RepeatGuard(
            [self.llm.tokenize(t.encode(), add_bos=False, special=False) for t in earlier], self.no_repeat_ngram
        )
        start: list[int] = []

        def block(input_ids, scores):  # noqa: ANN001, ANN202 - numpy arrays from llama_cpp
            if not start:
                start.append(len(input_ids))  # the prompt's length: what follows is this reply
            for token in guard.banned(input_ids[start[0] :]):
                scores[token] = -np.inf
            return scores

        return LogitsProcessorList([block]) if guard else None

    def stream(
        self, messages: Sequence[Message], options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        with self._lock:
            if not self.reuse_prefix:
                # Evaluate the whole prompt: a reused prefix changes the numerics just enough
                # to flip a greedy choice now and then.
                self.llm.reset()
            chunks = self.llm.create_chat_completion(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                max_tokens=options.max_tokens,
                temperature=options.temperature,
                seed=options.seed,
                repeat_penalty=options.repeat_penalty,
                stop=list(options.stop) or None,
                logits_processor=self._guard(messages),
                stream=True,
            )
            try:
                try:
                    first = next(chunks)
                except ValueError as exc:  # llama.cpp: "Requested tokens (N) exceed context window of M"
                    if "context window" in str(exc):
                        raise ContextTooLong(f"the conversation does not fit the model: {exc}") from None
                    raise
                except StopIteration:
                    return
                for chunk in itertools.chain([first], chunks):
                    if cancel is not None and cancel.is_set():
                        return
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece:
                        yield piece
            finally:
                chunks.close()


class TransformersChat:
    name = "transformers"

    def __init__(self, model: ResolvedModel, cfg: LlmConfig = LlmConfig()) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ModelNotFound(
                "the transformers backend needs torch and `pip install 'moi[transformers]'`"
            ) from exc
        self.model_info = model
        self.torch = torch
        if model.format == "gguf":
            kwargs = {"gguf_file": model.path.name}
            where = str(model.path.parent)
        else:
            kwargs, where = {}, str(model.path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        if self.device == "cpu" and cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs).to(self.device)
        self.model.eval()
        self.no_repeat_ngram = cfg.no_repeat_ngram
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or cfg.context)

    def stream(
        self, messages: Sequence[Message], options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        cancel = cancel or threading.Event()
        done = threading.Event()  # set when our consumer leaves early: stops generate()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001, ANN204
                return cancel.is_set() or done.is_set()

        prompt = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        earlier = [m.content for m in messages if m.role == "assistant" and m.content]
        guard = RepeatGuard(
            [self.tokenizer.encode(t, add_special_tokens=False) for t in earlier], self.no_repeat_ngram
        ) if self.no_repeat_ngram else RepeatGuard([], 1)
        prompt_len = prompt["input_ids"].shape[1]
        if prompt_len + options.max_tokens > self.context:
            raise ContextTooLong(
                f"the conversation does not fit the model: {prompt_len} prompt tokens + {options.max_tokens} "
                f"to generate exceed its context window of {self.context}"
            )

        class _NoCopies(LogitsProcessor):
            def __call__(self, input_ids, scores):  # noqa: ANN001, ANN204
                for row in range(input_ids.shape[0]):
                    for token in guard.banned(input_ids[row, prompt_len:].tolist()):
                        scores[row, token] = -float("inf")
                return scores

        sampling = options.temperature > 0
        kwargs = dict(
            **prompt,
            max_new_tokens=options.max_tokens,
            repetition_penalty=options.repeat_penalty,
            do_sample=sampling,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
            logits_processor=LogitsProcessorList([_NoCopies()] if guard else []),
            pad_token_id=self.tokenizer.eos_token_id,
        )
        if sampling:
            kwargs["temperature"] = options.temperature
            self.torch.manual_seed(options.seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self.torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="moi-generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if cancel.is_set():
                    break
                if piece:
                    yield piece
        finally:
            done.set()
            worker.join()
        if errors:
            raise errors[0]


def load_chat(model: ResolvedModel, cfg: LlmConfig = LlmConfig()) -> ChatBackend:
    backend = cfg.backend
    if backend == "auto":
        backend = "llama_cpp" if model.format == "gguf" else "transformers"
    if backend == "llama_cpp":
        return LlamaCppChat(model, cfg)
    if backend == "transformers":
        return TransformersChat(model, cfg)
    raise ConfigError(f"unknown llm backend {cfg.backend!r}: use llama_cpp, transformers or auto")
