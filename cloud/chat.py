"""Chat on SmolLM2-Instruct, token by token, with two backends behind one interface.

- ``llama_cpp``: llama.cpp on a GGUF file (offline the shipped Q4_1, requantized to Q8_0 by the
  registry; Metal on a Mac). The fast local path: the seed talk's own note was "try llama_cpp".
- ``transformers``: Hugging Face transformers on a hub checkout (the GPU path on Modal) or on
  the same GGUF (dequantized to fp32, slow on CPU but the same weights).

Both apply the chat template that ships with the model, take a system prompt and a thread,
honour ``max_tokens`` and ``temperature``, and stop between tokens when ``cancel`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from shared.config import LlmConfig, model_threads
from shared.errors import ConfigError, ContextTooLong, ModelNotFound
from shared.messages import ChatOptions, Message
from shared.models import ResolvedModel

log = logging.getLogger(__name__)


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
            # the prompt too (llama-cpp-python's default is every core: with another program
            # busy on one core a 60-token prompt took 477 ms on two against 369 ms on one, and
            # live the first token came 0.73-1.01 s after the transcript instead of 0.05-0.18)
            n_threads=model_threads(cfg.threads),
            n_threads_batch=model_threads(cfg.threads),
            n_gpu_layers=-1,  # Metal/CUDA when the wheel has it; ignored on a CPU build
            seed=cfg.seed,
            verbose=False,
        )
        self.reuse_prefix = cfg.reuse_prefix
        self.no_repeat_ngram = cfg.no_repeat_ngram
        self._lock = threading.Lock()  # one llama context: one generation at a time
        self._turns_waiting = 0  # stream() calls waiting for the lock: a prefill gives way
        self._waiting_lock = threading.Lock()
        self._prefill = _Latest()

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

    def prefill(self, messages: Sequence[Message]) -> None:
        """Evaluate, in the background, the prompt the next reply will start with: ``messages``
        and the opening of the user's next message. That turn then evaluates only its own words.
        Without it, each time the thread drops its oldest turn (``LlmConfig.max_turns``) the next
        prompt is new from the system prompt on: ~400 tokens, 2.4-3.6 s on one core, measured
        live as the first token 3.6 s after the transcript. A reply waits at most for one chunk
        of ``PREFILL_CHUNK`` tokens (~0.1 s), then the prefill stops where it is."""
        if self.reuse_prefix:
            self._prefill.put(list(messages), self._prefilling, "llama-prefill")

    PREFILL_CHUNK = 16

    def _prefilling(self, messages: list[Message]) -> None:
        tokens = self._opening(messages)
        with self._lock:
            llm = self.llm
            held = llm.input_ids[: llm.n_tokens]
            i = next((j for j, (a, b) in enumerate(zip(held, tokens)) if a != b), min(len(held), len(tokens)))
            llm.n_tokens = i  # eval() drops the cache past here first
            while i < len(tokens) and not self._turns_waiting and not self._prefill.newer():
                llm.eval(tokens[i : i + self.PREFILL_CHUNK])
                i += self.PREFILL_CHUNK

    @functools.cached_property
    def _formatter(self):  # noqa: ANN202 - a llama_cpp Jinja2ChatFormatter, its template compiled once
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self.llm
        return Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm.detokenize([llm.token_eos()]).decode("utf-8", "replace"),
            bos_token=llm.detokenize([llm.token_bos()]).decode("utf-8", "replace"),
        )

    def _opening(self, messages: list[Message]) -> list[int]:
        """The tokens ``create_chat_completion`` will start the next prompt with: the chat template
        on ``messages`` and a user message, up to that message's words (less two tokens, which
        may merge differently with them)."""
        llm, mark = self.llm, "\ue000"
        result = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages]
                           + [{"role": "user", "content": mark}])
        text = result.prompt[: result.prompt.index(mark)]
        return llm.tokenize(text.encode("utf-8"), add_bos=not result.added_special, special=True)[:-2]

    def stream(
        self, messages: Sequence[Message], options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        with self._waiting_lock:
            self._turns_waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._waiting_lock:
                self._turns_waiting -= 1
        try:
            yield from self._stream(messages, options, cancel)
        finally:
            self._lock.release()

    def _stream(
        self, messages: Sequence[Message], options: ChatOptions, cancel: threading.Event | None
    ) -> Iterator[str]:
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


class _Latest:
    """One background worker that does only the latest job it was given: a job put while one
    runs replaces any still waiting (``newer`` tells the running one)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._job: object | None = None
        self._thread: threading.Thread | None = None

    def put(self, job: object, run, name: str) -> None:  # noqa: ANN001 - run(job) -> None
        with self._cond:
            self._job = job
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, args=(run,), name=name, daemon=True)
                self._thread.start()

    def newer(self) -> bool:
        return self._job is not None

    def _loop(self, run) -> None:  # noqa: ANN001
        while True:
            with self._cond:
                while self._job is None:
                    self._cond.wait()
                job, self._job = self._job, None
            try:
                run(job)
            except Exception:  # noqa: BLE001 - a prefill is only a head start: the turn evaluates what is missing
                log.debug("prefill failed", exc_info=True)


class TransformersChat:
    """SmolLM2 (or any causal LM checkpoint) on transformers: the GPU path, also the GGUF on CPU.

    Per token it does only what streaming needs: the no-copies guard runs on the device (no
    host copy of the sequence), the generate thread just hands each step's token over, and the
    consumer decodes. With ``static_cache`` (``auto``: on CUDA) one fixed-size KV cache is reused
    for every reply, so transformers compiles the decode step once (CUDA graphs) and a step is a
    few ms; generations then take turns on it (a lock).
    """

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
        if cfg.static_cache not in ("auto", "on", "off"):
            raise ConfigError(f"llm static_cache {cfg.static_cache!r}: use auto (on CUDA), on or off")
        self._cache = None
        self._lock = threading.Lock()
        self.last_tokens = 0
        if cfg.static_cache == "on" or (cfg.static_cache == "auto" and self.device == "cuda"):
            from transformers import StaticCache

            self.context = min(self.context, cfg.context)  # the cache holds this much, allocated once
            self._cache = StaticCache(config=self.model.config, max_cache_len=self.context)

    def stream(
        self, messages: Sequence[Message], options: ChatOptions, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        torch = self.torch
        cancel = cancel or threading.Event()
        done = threading.Event()  # set when our consumer leaves early: stops generate()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ANN001, ANN204
                return torch.full((input_ids.shape[0],), cancel.is_set() or done.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        prompt = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).to(self.device)
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
        tokens = _Tokens()
        sampling = options.temperature > 0
        kwargs = dict(
            **prompt,
            max_new_tokens=options.max_tokens,
            repetition_penalty=options.repeat_penalty,
            do_sample=sampling,
            streamer=tokens,
            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
            logits_processor=LogitsProcessorList([_NoCopies(guard, prompt_len, self.device)] if guard else []),
            pad_token_id=self.tokenizer.eos_token_id,
        )
        if sampling:
            kwargs["temperature"] = options.temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock if self._cache is not None else contextlib.nullcontext(), torch.inference_mode():
                    if self._cache is not None:
                        self._cache.reset()
                        kwargs["past_key_values"] = self._cache  # (transformers 5 also calls it `cache`)
                    if sampling:
                        torch.manual_seed(options.seed)
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
            finally:
                tokens.end()

        worker = threading.Thread(target=run, name="moi-generate", daemon=True)
        worker.start()
        try:
            ids: list[int] = []
            shown = 0
            while (step := tokens.queue.get()) is not None:
                if cancel.is_set():
                    break
                ids.extend(step.reshape(-1).tolist())  # one token: the one host sync streaming needs
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # a character split across tokens: wait for the rest of it
                piece, shown = text[shown:], len(text)
                if piece:
                    yield piece
        finally:
            done.set()
            worker.join()
            self.last_tokens = len(ids)  # for benches: tokens the last reply took
        if errors:
            raise errors[0]


class _Tokens:
    """generate()'s streamer: the generate thread only queues each step's token tensor; the
    consumer's thread decodes (transformers calls ``put`` with the prompt first, then a token a
    step, and ``end`` once)."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._prompt = True

    def put(self, value) -> None:  # noqa: ANN001 - a tensor
        if self._prompt:
            self._prompt = False
            return
        self.queue.put(value)

    def end(self) -> None:
        self.queue.put(None)


class _NoCopies:
    """:class:`RepeatGuard` as a logits processor on the device: the last ``n - 1`` tokens of
    each row are compared with every banned prefix at once, no host copy, no sync."""

    def __init__(self, guard: RepeatGuard, prompt_len: int, device: str) -> None:
        import torch

        self.torch = torch
        self.n, self.prompt_len = guard.n, prompt_len
        pairs = [(prefix, token) for prefix, banned in guard.table.items() for token in banned]
        self.prefixes = torch.tensor([p for p, _ in pairs], dtype=torch.long, device=device).reshape(len(pairs), self.n - 1)
        self.banned = torch.tensor([t for _, t in pairs], dtype=torch.long, device=device)

    def __call__(self, input_ids, scores):  # noqa: ANN001, ANN204 - tensors
        torch, keep = self.torch, self.n - 1
        if input_ids.shape[1] - self.prompt_len < keep:
            return scores
        if keep:
            hit = (input_ids[:, -keep:, None] == self.prefixes.T[None]).all(1)  # [rows, pairs]
        else:
            hit = torch.ones((input_ids.shape[0], len(self.banned)), dtype=torch.bool, device=scores.device)
        ban = torch.zeros_like(scores).index_add_(1, self.banned, hit.to(scores.dtype))
        return scores.masked_fill(ban > 0, -float("inf"))


def load_chat(model: ResolvedModel, cfg: LlmConfig = LlmConfig()) -> ChatBackend:
    backend = cfg.backend
    if backend == "auto":
        backend = "llama_cpp" if model.format == "gguf" else "transformers"
    if backend == "llama_cpp":
        return LlamaCppChat(model, cfg)
    if backend == "transformers":
        return TransformersChat(model, cfg)
    raise ConfigError(f"unknown llm backend {cfg.backend!r}: use llama_cpp, transformers or auto")
