"""Continuous batching (chatbot.batching) on CPU with a tiny random model.

The model's weights are re-drawn with a large spread so that every prompt gets its own continuation
(the conftest model, initialised like a real one, answers almost everything with newlines): a batch
that mixed up rows, positions or masks would then show it in the text.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from chatbot.generation import Generator, LocalGenerator
from chatbot.models import LoadedModel, load_model
from chatbot.services import build_engine
from chatbot.settings import Settings
from tests.test_generation import _make_adapter

QUESTIONS = [
    "How long does shipping take?",
    "Where is my order?",
    "Can I get a refund for a broken lamp?",
    "Which payment methods do you take?",
    "Hello there",
    "Do you ship to Canada and how much does it cost?",
]
LIMITS = [12, 5, 20, 3, 9, 16]


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You help customers."}, {"role": "user", "content": question}]


@pytest.fixture
def chaotic(tiny_settings: Settings) -> LoadedModel:
    loaded = load_model(tiny_settings.model, tiny_settings.data_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.normal_(0, 0.3)
    return loaded


def _pair(settings: Settings, loaded: LoadedModel, slots: int) -> tuple[LocalGenerator, LocalGenerator]:
    """The one-at-a-time generator (the reference) and a batching one over the same weights."""
    off, on = (dataclasses.replace(settings.model, batching=b) for b in ("off", "on"))
    sequential = LocalGenerator(off, settings.data_dir, loaded=loaded)
    batched = LocalGenerator(on, settings.data_dir, loaded=loaded, slots=slots)
    return sequential, batched


def _concurrently(fn, count: int, stagger_s: float = 0.0) -> list:
    results: list = [None] * count

    def run(i: int) -> None:
        time.sleep(stagger_s * i)
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_concurrent_streams_each_get_exactly_their_own_greedy_tokens(tiny_settings, chaotic) -> None:
    sequential, batched = _pair(tiny_settings, chaotic, slots=3)
    try:
        want = [sequential.generate(_messages(q), max_new_tokens=n) for q, n in zip(QUESTIONS, LIMITS, strict=True)]
        assert len(set(want)) == len(want)  # the prompts really do lead to different answers
        # 6 requests for 3 rows, arriving one after another: later ones join while others decode.
        got = _concurrently(
            lambda i: "".join(batched.stream(_messages(QUESTIONS[i]), max_new_tokens=LIMITS[i])), 6, 0.01
        )
        assert got == want
        stats = batched.scheduler.stats()
        assert stats["active"] == 0 and stats["queued"] == 0
        # Sharing steps: fewer decode steps than tokens generated.
        assert stats["steps"] < sum(LIMITS)
    finally:
        batched.close()


def test_token_limit_is_per_request(tiny_settings, chaotic) -> None:
    _, batched = _pair(tiny_settings, chaotic, slots=4)
    try:
        scheduler = batched.scheduler
        ids = batched.tokenizer("FAQ entries: Customer question: where", add_special_tokens=False)["input_ids"]
        scheduler.eos_ids = set()  # so every request runs to its own limit
        requests = [scheduler.submit(ids, n) for n in (1, 4, 9, 2)]
        counts = []
        for request in requests:
            tokens = []
            while (token := request.next_token(timeout=30)) is not None:
                tokens.append(token)
            counts.append(len(tokens))
        assert counts == [1, 4, 9, 2]
    finally:
        batched.close()


def test_time_axis_rebases_keep_answers_exact(tiny_settings, chaotic) -> None:
    settings = tiny_settings.replace(model={"context_window": 256})
    sequential, batched = _pair(settings, chaotic, slots=2)
    scheduler = batched.scheduler
    try:
        # Different lengths, so rows leave at different steps and the batch never empties.
        limits = [30 + (17 * i) % 40 for i in range(12)]
        questions = QUESTIONS * 2
        want = [sequential.generate(_messages(q), max_new_tokens=n) for q, n in zip(questions, limits, strict=True)]
        # Hold the scheduler while all 12 queue in a known order: the run is the same every time.
        gate = threading.Event()
        holder = threading.Thread(target=scheduler.between_batches, args=(gate.wait,))
        holder.start()
        requests = [
            scheduler.submit(batched._fit(_messages(q), n)[0], n) for q, n in zip(questions, limits, strict=True)
        ]
        gate.set()
        got = []
        for request in requests:
            tokens = []
            while (token := request.next_token(timeout=60)) is not None:
                tokens.append(token)
            got.append(batched.tokenizer.decode(tokens, skip_special_tokens=True))
        holder.join(timeout=30)
        assert got == want
        assert scheduler.stats()["rebases"] > 0  # the 320-column axis ran out and was reused
    finally:
        batched.close()


def test_an_abandoned_stream_frees_its_slot(tiny_settings, chaotic) -> None:
    sequential, batched = _pair(tiny_settings, chaotic, slots=1)
    try:
        stream = batched.stream(_messages(QUESTIONS[2]), max_new_tokens=200)
        next(stream)
        assert batched.scheduler.stats()["active"] == 1
        stream.close()  # the customer left
        # The only slot is free again: the next customer is served, and exactly.
        want = sequential.generate(_messages(QUESTIONS[0]), max_new_tokens=8)
        assert batched.generate(_messages(QUESTIONS[0]), max_new_tokens=8) == want
        assert batched.scheduler.stats()["active"] == 0
    finally:
        batched.close()


def test_a_full_batch_queues_in_arrival_order(tiny_settings, chaotic) -> None:
    _, batched = _pair(tiny_settings, chaotic, slots=1)
    try:
        scheduler = batched.scheduler
        scheduler.eos_ids = set()
        ids = batched.tokenizer("Where is my order?", add_special_tokens=False)["input_ids"]
        first = scheduler.submit(ids, 50)
        assert first.next_token(timeout=30) is not None  # it holds the only slot
        waiting = [scheduler.submit(ids, 2) for _ in range(4)]
        assert [r.queue_position for r in waiting] == [0, 1, 2, 3]
        assert scheduler.stats()["queued"] == 4
        waiting[2].cancel()  # a customer gives up while queued: dropped, the others keep their order
        for request in waiting:
            while request.next_token(timeout=30) is not None:
                pass
        first.cancel()
        served = [r for r in waiting if r.started_at is not None]
        assert served == [waiting[0], waiting[1], waiting[3]]
        assert served == sorted(served, key=lambda r: r.started_at)
        assert all(r.waited_s > 0 for r in served)
    finally:
        batched.close()


def test_an_adapter_switch_waits_for_the_running_batch_and_drops_nothing(
    tiny_settings, chaotic, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = _make_adapter(tiny_model_dir, tmp_path / "faq-v1")
    sequential, batched = _pair(tiny_settings, chaotic, slots=2)
    try:
        plain = sequential.generate(_messages(QUESTIONS[2]), max_new_tokens=20)
        # The batch serves the adapter merged into the weights: compare with a merged copy (merged and
        # unmerged LoRA differ in float rounding, which these chaotic weights amplify).
        merged = PeftModel.from_pretrained(copy.deepcopy(chaotic.model), str(adapter)).merge_and_unload()
        # 30 ms a step, so the answer is still running when the switch is asked for.
        slow = chaotic.model.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
        stream = batched.stream(_messages(QUESTIONS[2]), max_new_tokens=20)
        chunks = [next(stream)]
        switch = threading.Thread(target=batched.set_adapter, args=(adapter, "v1"))
        switch.start()
        time.sleep(0.2)
        assert switch.is_alive()  # waiting for the running answer to finish
        chunks += list(stream)
        switch.join(timeout=30)
        slow.remove()
        assert "".join(chunks) == plain  # the running answer kept the model it started with
        assert batched.adapter == "v1"
        with_adapter = batched.generate(_messages(QUESTIONS[2]), max_new_tokens=20)
        reference = LocalGenerator(
            dataclasses.replace(tiny_settings.model, batching="off"),
            tiny_settings.data_dir,
            loaded=dataclasses.replace(chaotic, model=merged),
        )
        assert with_adapter == reference.generate(_messages(QUESTIONS[2]), max_new_tokens=20) != plain
        batched.set_adapter(None)
        assert batched.generate(_messages(QUESTIONS[2]), max_new_tokens=20) == plain
    finally:
        batched.close()


class _GroundedForShipping(Generator):
    """Streams through the batching generator; for the shipping question it shows the FAQ's own
    wording instead of the random model's text (after running that request through the batch)."""

    batches = True
    name = "tiny"

    def __init__(self, inner: LocalGenerator) -> None:
        self.inner = inner

    def stream(self, messages, *, max_new_tokens=None):
        drafted = "".join(self.inner.stream(messages, max_new_tokens=max_new_tokens))
        if messages[-1]["content"].rstrip().endswith("shipping take?"):
            yield "Standard shipping takes 3-7 business days."
        else:
            yield drafted


def test_the_engine_guard_judges_each_batched_answer_on_its_own(tiny_settings, chaotic, embedder) -> None:
    from tests.test_engine import ENTRIES

    settings = tiny_settings.replace(
        server={"generation_concurrency": 3},
        policy={"faq_threshold": 1.0, "relevance_threshold": 0.0, "clarify_margin": 0.0},
    )
    _, batched = _pair(settings, chaotic, slots=3)
    engine = build_engine(settings, embedder=embedder, generator=_GroundedForShipping(batched))
    engine.kb.upsert(ENTRIES)
    questions = ["How long does shipping take?", "How do I return an item?", "Can I pay with a gift card?"]
    try:
        answers = _concurrently(lambda i: engine.answer(questions[i]), 3)
        assert answers[0].mode == "generated" and answers[0].text == "Standard shipping takes 3-7 business days."
        for answer in answers[1:]:
            # Random-weight text is not grounded: each rejected draft is replaced by its own fallback.
            assert "generated answer rejected" in answer.reason
            assert answer.mode in ("faq", "handoff")
        assert batched.scheduler.stats()["steps"] > 0
    finally:
        batched.close()
