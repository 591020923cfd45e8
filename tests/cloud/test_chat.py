import threading

import pytest

from cloud.chat import RepeatGuard, TransformersChat
from shared.config import LlmConfig
from shared.messages import ChatOptions, Message, Thread
from shared.models import resolve

SYSTEM = LlmConfig().system_prompt


def ask(chat, thread, **opts):
    return list(chat.stream(thread.messages(), ChatOptions(**opts)))


def test_streams_tokens_and_honours_max_tokens(chat):
    thread = Thread(SYSTEM)
    thread.add_user("Tell me a long story about a dragon who learns to cook.")
    tokens = ask(chat, thread, max_tokens=24)
    assert len(tokens) > 5  # streamed piece by piece, not one blob
    assert 5 < len("".join(tokens).split()) <= 24
    assert len(ask(chat, thread, max_tokens=4)) <= 4


def test_deterministic_at_temperature_zero(chat):
    thread = Thread(SYSTEM)
    thread.add_user("What is your favourite colour?")
    assert ask(chat, thread, max_tokens=20) == ask(chat, thread, max_tokens=20)


def test_thread_carries_earlier_turns(chat):
    thread = Thread(SYSTEM, max_turns=2)
    thread.add_user("My name is Ada and I build robots.")
    thread.add_assistant("".join(ask(chat, thread, max_tokens=20)))
    thread.add_user("What do I build?")
    assert [m.role for m in thread.messages()] == ["system", "user", "assistant", "user"]
    fresh = Thread(SYSTEM)
    fresh.add_user("What do I build?")
    # the 135M model is weak on facts: assert the history reaches it, not what it recalls
    assert ask(chat, thread, max_tokens=24) != ask(chat, fresh, max_tokens=24)
    for i in range(3):  # bounded: older exchanges fall off
        thread.add_assistant("ok")
        thread.add_user(f"question {i}")
    assert [m.content for m in thread.messages() if m.role == "user"] == ["question 1", "question 2"]


def test_cancel_stops_mid_generation(chat):
    thread = Thread(SYSTEM)
    thread.add_user("Count from one to one hundred, in words.")
    cancel = threading.Event()
    got = []
    for token in chat.stream(thread.messages(), ChatOptions(max_tokens=200), cancel):
        got.append(token)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 3


def test_thread_rules():
    thread = Thread("sys", max_turns=3)
    with pytest.raises(ValueError):
        thread.add_assistant("no user yet")
    thread.add_user("hi")
    thread.drop_last_user()
    assert thread.messages()[-1].role == "system" and len(thread) == 0


def test_thread_items_keep_their_ids_and_can_be_deleted():
    """A Realtime connection's items: typed messages wait for a reply, ids delete them, and the
    oldest turns fall off the front (by count, and by size with the newest turn kept)."""
    thread = Thread("sys", max_turns=2)
    thread.add_user("first", "u1")
    assert thread.waiting is not None and thread.waiting.id == "u1"
    thread.add_assistant("one", "a1")
    assert thread.waiting is None
    thread.add_exchange("second", "two", ("u2", "a2"))
    thread.add_user("third", "u3")  # a third turn: the first falls off
    assert [m.id for m in thread.messages()] == ["", "u2", "a2", "u3"] and len(thread) == 2
    assert thread.delete("a2") and not thread.delete("a2") and not thread.delete("")
    assert [m.content for m in thread.messages()] == ["sys", "second", "third"]
    assert [m.content for m in thread.messages(max_chars=len("sys") + len("third"))] == ["sys", "third"]


def test_a_reply_cut_short_is_revised_in_its_place():
    """A stopped reply keeps only what was heard of it, in its place and under its id; nothing
    heard forgets a spoken exchange whole, and only the reply to a typed message (still waiting)."""
    thread = Thread("sys")
    cut = thread.add_exchange("first", "one two three", ("u1", "a1"))
    thread.add_user("typed", "u2")  # a Realtime client's item, after it
    assert thread.revise(cut, "one", with_user=True).id == "a1"
    assert [(m.content, m.id) for m in thread.messages()][1:] == [("first", "u1"), ("one", "a1"), ("typed", "u2")]
    reply = thread.add_assistant("sure thing", "a2")
    assert thread.revise(reply, "", with_user=False) is None
    assert thread.waiting is not None and thread.waiting.content == "typed"
    thread.add_exchange("again", "yes")
    said = thread.add_exchange("last", "no")
    assert thread.revise(said, "", with_user=True) is None
    assert [m.content for m in thread.messages()][-2:] == ["again", "yes"]
    assert thread.revise(said, "gone", with_user=True) is None  # not there any more: nothing changes
    assert [m.content for m in thread.messages()][-2:] == ["again", "yes"]


@pytest.mark.slow
def test_transformers_backend_on_the_same_weights():
    """The GPU path's code on the shipped GGUF (dequantized, CPU): streams, stops, cancels."""
    chat = TransformersChat(resolve("llm"), LlmConfig(threads=2))
    thread = Thread(SYSTEM)
    thread.add_user("Say hello to the people at the conference.")
    tokens = ask(chat, thread, max_tokens=12)
    assert len(tokens) > 2 and "".join(tokens).strip()
    cancel = threading.Event()
    got = []
    for token in chat.stream(thread.messages(), ChatOptions(max_tokens=100), cancel):
        got.append(token)
        cancel.set()
    assert len(got) <= 2


@pytest.fixture(scope="module")
def reusing():
    """llama.cpp as the live pipeline runs it: the cached prompt prefix reused between turns."""
    from cloud.chat import LlamaCppChat

    return LlamaCppChat(resolve("llm"), LlmConfig(reuse_prefix=True))


def converse(chat, questions, max_tokens=30):
    thread, replies = Thread(SYSTEM), []
    for q in questions:
        thread.add_user(q)
        replies.append("".join(ask(chat, thread, max_tokens=max_tokens)).strip())
        thread.add_assistant(replies[-1])
    return replies


def test_two_different_questions_get_two_different_answers_with_prefix_reuse(reusing):
    first, second = converse(reusing, ["How do I get to Dublin?", "What should I cook for dinner tonight?"])
    assert first and second and first != second
    assert not second.startswith(first[:30])


SAMPLE_TURNS = ["and says how do I get to Dublin?", "And the answer that comes back is, well, I wouldn't start from here, sonny."]


@pytest.mark.parametrize("follow_up", ["Tell me more.", SAMPLE_TURNS[1]])
def test_a_follow_up_is_not_answered_with_the_last_reply_again(reusing, follow_up):
    """The repeat penalty sees only the tokens of the reply being generated, so at temperature 0
    SmolLM2 answered any follow-up that was not a question with its previous answer, word for
    word (the bundled sample's second turn). No run of 4 tokens of an earlier reply comes back."""
    first, second = converse(reusing, [SAMPLE_TURNS[0], follow_up])
    a, b = first.split(), second.split()
    shared_runs = {tuple(b[i : i + 5]) for i in range(len(b) - 4)} & {tuple(a[i : i + 5]) for i in range(len(a) - 4)}
    assert second and not shared_runs, (first, second)


def test_the_repeat_guard_can_be_turned_off():
    from cloud.chat import LlamaCppChat

    plain = LlamaCppChat(resolve("llm"), LlmConfig(no_repeat_ngram=0, reuse_prefix=False))
    first, second = converse(plain, SAMPLE_TURNS)  # the bundled sample's two turns, prompts whole
    assert second.split()[:8] == first.split()[:8]  # what the guard prevents: the same answer again


def test_a_thread_past_the_context_is_a_clear_error_and_the_pipeline_trims_it(chat):
    from shared.errors import ContextTooLong

    thread = Thread(SYSTEM)
    thread.add_user("word " * 5000)
    with pytest.raises(ContextTooLong, match="does not fit"):
        ask(chat, thread, max_tokens=16)
    long = Thread(SYSTEM, max_turns=50)
    for i in range(40):
        long.add_exchange(f"question {i} " + "blah " * 60, "answer " * 60)
    kept = long.messages(max_chars=3000)
    assert kept[0].role == "system" and sum(len(m.content) for m in kept) <= 3000
    assert kept[-1].content == long.messages()[-1].content  # the newest exchange stays, the oldest go
    tokens = ask(chat, Thread(SYSTEM), max_tokens=4)  # the model is fine after the refusal
    assert tokens


def test_the_device_side_guard_bans_what_the_repeat_guard_bans():
    """TransformersChat's guard runs on the device (no host copy a token); it must ban exactly
    what RepeatGuard bans for every reply so far."""
    import torch

    from cloud.chat import _NoCopies

    for n in (1, 3):
        guard = RepeatGuard([[1, 2, 3, 4, 5], [7, 2, 3, 9]], n)
        processor = _NoCopies(guard, prompt_len=2, device="cpu")
        for generated in ([], [2], [5, 2, 3], [0, 1, 2], [4, 7, 2, 3], [2, 3, 4, 5]):
            out = processor(torch.tensor([[11, 12, *generated]]), torch.zeros(1, 16))
            assert {i for i in range(16) if out[0, i] == -float("inf")} == guard.banned(generated), (n, generated)


def test_a_prefill_leaves_only_the_next_message_to_evaluate_even_after_the_thread_drops_a_turn(reusing):
    """When the thread drops its oldest turn the next prompt differs from the system prompt on
    (hundreds of tokens to evaluate before the first word). ``prefill`` evaluates that prompt in
    the background up to the next message's words: the turn then finds all of it cached."""
    import time

    thread = Thread(SYSTEM, max_turns=2)
    for q in ("How do I get to Dublin?", "What should I cook tonight?", "Tell me about trains."):
        thread.add_user(q)
        thread.add_assistant("".join(ask(reusing, thread, max_tokens=16)).strip())
    assert [m.content for m in thread.messages() if m.role == "user"][0] == "What should I cook tonight?"
    llm = reusing.llm
    opening = reusing._opening(thread.messages())
    held = list(llm.input_ids[: llm.n_tokens])
    assert held[: len(opening)] != opening  # the cache holds the prompt before the drop
    reusing.prefill(thread.messages())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and list(llm.input_ids[: llm.n_tokens]) != opening[: llm.n_tokens]:
        time.sleep(0.05)
    while time.monotonic() < deadline and llm.n_tokens < len(opening):
        time.sleep(0.05)
    with reusing._lock:  # the prefill has let go
        assert list(llm.input_ids[: llm.n_tokens])[: len(opening)] == opening
    # the next turn's prompt (the thread and its new message, as run_turn asks) starts with
    # exactly what is cached: only its own words are left
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [*thread.messages(), Message("user", "And what about buses?")]
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
    prompt = formatter(messages=[{"role": m.role, "content": m.content} for m in messages]).prompt
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert tokens[: len(opening)] == opening and len(tokens) - len(opening) < 16
    assert "".join(reusing.stream(messages, ChatOptions(max_tokens=8))).strip()
