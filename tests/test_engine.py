"""The chat engine and its answer policy, with the fake embedder and scripted or tiny models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatbot.engine import ChatEngine
from chatbot.followup import is_elliptic, resolve_followup
from chatbot.generation import Generator
from chatbot.grounding import grounding_score, is_refusal, leaks
from chatbot.policy import decide
from chatbot.prompts import load_prompt
from chatbot.services import build_engine, demo_file
from chatbot.settings import PolicySettings
from knowledge_base.entry import FAQEntry
from knowledge_base.errors import SupportBotError
from knowledge_base.retriever import SearchHit

ENTRIES = [
    FAQEntry("ship", "How long does shipping take?", "Standard shipping takes 3-7 business days.", category="shipping"),
    FAQEntry("express", "How much is express shipping?", "Express shipping costs $14.95 and takes 1-2 days."),
    FAQEntry("return", "How do I return an item?", "Start a return from Account > Orders within 30 days."),
    FAQEntry("giftcard", "Can I pay with a gift card?", "Yes, enter the gift card code at checkout."),
]


class ScriptedGenerator(Generator):
    """Streams a fixed reply (or a function of the prompt) word by word, and records its prompts."""

    name = "scripted"
    adapter = None

    def __init__(self, reply: str | None = None, *, echo_prompt: bool = False) -> None:
        self.reply = reply
        self.echo_prompt = echo_prompt
        self.prompts: list[list[dict[str, str]]] = []

    def stream(self, messages, *, max_new_tokens=None) -> Iterator[str]:
        self.prompts.append(messages)
        text = "\n".join(m["content"] for m in messages) if self.echo_prompt else (self.reply or "")
        for word in text.split(" "):
            yield word + " "

    def set_adapter(self, path, version=None) -> None:
        self.adapter = version


def hit(entry_id: str, score: float) -> SearchHit:
    entry = next(e for e in ENTRIES if e.id == entry_id)
    return SearchHit(entry, score)


@pytest.fixture
def policy() -> PolicySettings:
    return PolicySettings(faq_threshold=0.7, relevance_threshold=0.5, clarify_margin=0.03)


@pytest.fixture
def engine_factory(settings, embedder):
    def make(generator: Generator | None = None, **policy) -> ChatEngine:
        s = settings.replace(policy=policy) if policy else settings
        engine = build_engine(s, embedder=embedder, generator=generator or ScriptedGenerator("unused"))
        engine.kb.upsert(ENTRIES)
        return engine

    return make


# -- the policy ------------------------------------------------------------------------------------
def test_confident_match_answers_from_the_faq(policy):
    d = decide("how long does shipping take", [hit("ship", 0.9), hit("express", 0.6)], policy)
    assert d.mode == "faq" and [h.entry.id for h in d.hits] == ["ship"]


def test_close_candidates_ask_did_you_mean(policy):
    d = decide("shipping", [hit("ship", 0.80), hit("express", 0.79), hit("return", 0.2)], policy)
    assert d.mode == "clarify" and [h.entry.id for h in d.hits] == ["ship", "express"]


def test_middle_band_generates_from_the_relevant_entries(policy):
    d = decide("delivery times?", [hit("ship", 0.62), hit("express", 0.55), hit("return", 0.3)], policy)
    assert d.mode == "generated" and [h.entry.id for h in d.hits] == ["ship", "express"]


def test_a_question_combining_two_entries_is_generated(policy):
    d = decide("can I return it and pay with a gift card?", [hit("return", 0.8), hit("giftcard", 0.7)], policy)
    assert d.mode == "generated"


def test_nothing_relevant_hands_off(policy):
    assert decide("what's the weather", [hit("ship", 0.3)], policy).mode == "handoff"
    assert decide("anything", [], policy).mode == "handoff"


def test_without_generation_the_middle_band_offers_choices(policy):
    off = PolicySettings(faq_threshold=0.7, relevance_threshold=0.5, generate=False)
    d = decide("delivery", [hit("ship", 0.62), hit("express", 0.55)], off)
    assert d.mode == "clarify"


# -- grounding and the injection guard ---------------------------------------------------------------
def test_grounding_scores_answers_by_their_words_in_the_sources():
    source = "Standard shipping takes 3-7 business days."
    assert grounding_score("Shipping takes 3-7 business days.", [source]) == 1.0
    assert grounding_score("Run apt-get install git to fix strikethrough.", [source]) < 0.3
    assert is_refusal("I don't know.") and not is_refusal("It takes 3 days.")
    assert is_refusal("I don’t know, sorry.") and is_refusal("")  # a curly apostrophe; an empty answer


def test_leak_guard_catches_the_system_prompt_and_secrets():
    system = load_prompt("system")
    assert leaks("Sure! " + system, system_prompt=system) == "system prompt"
    assert leaks("the key is sk-secret-123", system_prompt=system, secrets=["sk-secret-123"]) == "secret"
    assert leaks("Standard shipping takes 3-7 business days.", system_prompt=system) is None


def _attacks() -> list[dict]:
    path = demo_file("injection_attacks.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_injection_set_has_at_least_30_attacks():
    assert len(_attacks()) >= 30


def test_no_injection_attack_leaks_even_when_the_model_obeys_it(engine_factory, settings):
    """The worst model: one that prints its whole prompt. The guard must still leak nothing."""
    secret_settings = {"openai_api_key": "sk-test-very-secret"}
    engine = engine_factory(ScriptedGenerator(echo_prompt=True), relevance_threshold=0.0, faq_threshold=1.0)
    engine._secrets.append(secret_settings["openai_api_key"])
    other = engine.answer("my email is jane.doe@example.com, how long does shipping take?")
    system = load_prompt("system")
    for attack in _attacks():
        answer = engine.answer(attack["text"])
        assert leaks(answer.text, system_prompt=system, secrets=["sk-test-very-secret"]) is None, attack
        assert "jane.doe" not in answer.text
        assert other.conversation_id != answer.conversation_id


# -- the engine ----------------------------------------------------------------------------------
def test_faq_answers_are_verbatim_cited_and_stored(engine_factory):
    engine = engine_factory()
    answer = engine.answer("How long does shipping take?")
    assert answer.mode == "faq"
    assert answer.text == ENTRIES[0].answer
    assert answer.sources == ["ship"] and answer.citations[0]["id"] == "ship"
    stored = engine.store.history(answer.conversation_id)
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[1].mode == "faq" and stored[1].sources == ["ship"]
    assert engine.kb.get("ship").hits == 1


def test_faq_mode_never_calls_the_generator(engine_factory):
    generator = ScriptedGenerator("should not be used")
    engine = engine_factory(generator)
    engine.answer("How do I return an item?")
    assert generator.prompts == []


def test_handoff_queues_the_question_and_says_how_to_reach_a_person(engine_factory, settings):
    engine = engine_factory()
    answer = engine.answer("zebra quantum violin")
    assert answer.mode == "handoff"
    assert answer.text == settings.policy.handoff_message
    queued = engine.store.unanswered()
    assert [q.question for q in queued] == ["zebra quantum violin"]


def test_an_empty_knowledge_base_hands_off(settings, embedder):
    engine = build_engine(settings, embedder=embedder, generator=ScriptedGenerator("x"))
    assert engine.answer("How long does shipping take?").mode == "handoff"


def test_clarify_offers_the_candidates_as_options(engine_factory):
    engine = engine_factory(relevance_threshold=0.0, clarify_margin=1.0)
    answer = engine.answer("shipping")
    assert answer.mode == "clarify"
    assert len(answer.options) >= 2 and answer.text.startswith("Did you mean")


def test_grounded_generation_streams_and_cites_its_sources(engine_factory):
    reply = "Standard shipping takes 3-7 business days."
    engine = engine_factory(ScriptedGenerator(reply), relevance_threshold=0.0, faq_threshold=1.0, clarify_margin=0.0)
    events = list(engine.answer_stream("when will my order arrive"))
    deltas = "".join(e.text for e in events if e.kind == "delta")
    final = events[-1].answer
    assert final is not None and final.mode == "generated"
    assert deltas.strip() == final.text == reply
    assert final.sources and final.model == "scripted"


def test_an_invented_answer_falls_back_to_the_faq_or_a_handoff(engine_factory):
    invented = "Run apt-get install git and then restart your router twice."
    engine = engine_factory(ScriptedGenerator(invented), relevance_threshold=0.0, faq_threshold=1.0, clarify_margin=0.0)
    answer = engine.answer("How long does shipping take?")
    assert answer.mode in ("faq", "handoff")
    assert invented not in answer.text
    assert "rejected" in answer.reason


def test_follow_ups_are_resolved_against_the_conversation(engine_factory):
    engine = engine_factory()
    first = engine.answer("How much is express shipping?")
    second = engine.answer("and how long does it take?", first.conversation_id)
    assert second.question.startswith("How much is express shipping")
    assert is_elliptic("and to Canada?") and not is_elliptic("How do I return a kettle I bought last week?")
    assert resolve_followup("and to Canada?", [], engine.kb.search, 3)[0] == "and to Canada?"


def test_a_follow_up_ranks_entries_by_both_the_message_and_the_topic(engine_factory):
    engine = engine_factory()
    question, hits = resolve_followup(
        "and how long does it take?", ["How much is express shipping?"], engine.kb.search, 3
    )
    assert question == "How much is express shipping? and how long does it take?"
    alone = {h.entry.id: h.score for h in engine.kb.search("and how long does it take?", 10)}
    joint = {h.entry.id: h.score for h in engine.kb.search(question, 10)}
    for hit in hits:
        assert hit.score == pytest.approx((alone.get(hit.entry.id, 0) + joint.get(hit.entry.id, 0)) / 2)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_generation_gets_the_conversation_history(engine_factory):
    generator = ScriptedGenerator("Standard shipping takes 3-7 business days.")
    engine = engine_factory(generator, relevance_threshold=0.0, faq_threshold=1.0, clarify_margin=0.0)
    first = engine.answer("hello there, how long does shipping take")
    engine.answer("and express?", first.conversation_id)
    roles = [m["role"] for m in generator.prompts[-1]]
    assert roles[0] == "system" and roles[-1] == "user" and "assistant" in roles


def test_bad_messages_get_clear_errors(engine_factory):
    engine = engine_factory()
    with pytest.raises(SupportBotError, match="empty"):
        engine.answer("   ")
    with pytest.raises(SupportBotError, match="4000"):
        engine.answer("x" * 5000)


def test_thumbs_down_is_stored_and_queued(engine_factory):
    engine = engine_factory()
    answer = engine.answer("How do I return an item?")
    engine.feedback(answer.message_id, "down", "not helpful")
    assert [q.reason for q in engine.store.unanswered()] == ["thumbs_down"]
    with pytest.raises(SupportBotError):
        engine.feedback(answer.message_id, "meh")


def test_personal_data_is_redacted_before_storage(engine_factory):
    engine = engine_factory()
    answer = engine.answer("my email is jane@example.com, where is my refund?")
    stored = engine.store.history(answer.conversation_id)[0].text
    assert "jane@example.com" not in stored and "[email]" in stored


def test_suggested_questions_follow_what_customers_ask(engine_factory):
    engine = engine_factory()
    engine.answer("How do I return an item?")
    assert engine.suggested_questions(2)[0] == "How do I return an item?"


def test_the_engine_swaps_to_the_active_adapter_without_restart(engine_factory, settings):
    from chatbot.adapters import AdapterRegistry

    generator = ScriptedGenerator("Standard shipping takes 3-7 business days.")
    engine = engine_factory(generator, relevance_threshold=0.0, faq_threshold=1.0, clarify_margin=0.0)
    engine.answer("when does my order arrive")
    assert generator.adapter is None
    folder = settings.data_dir / "adapters" / "v1"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    registry = AdapterRegistry(settings.data_dir)
    registry.activate("v1")
    answer = engine.answer("when does my order arrive")
    assert generator.adapter == registry.active().version and answer.adapter == generator.adapter
    registry.deactivate()
    engine.answer("when does my order arrive")
    assert generator.adapter is None


def test_the_tiny_model_runs_the_whole_pipeline(tiny_settings, embedder):
    engine = build_engine(
        tiny_settings.replace(policy={"relevance_threshold": 0.0, "faq_threshold": 1.0, "clarify_margin": 0.0}),
        embedder=embedder,
    )
    engine.kb.upsert(ENTRIES)
    events = list(engine.answer_stream("when will my parcel arrive"))
    final = events[-1].answer
    assert final is not None and final.mode in ("generated", "faq", "handoff")
    assert final.model is not None


@pytest.mark.slow
def test_real_models_answer_the_demo_faq(tmp_path: Path):
    from chatbot.settings import load_settings

    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    engine = build_engine(settings)
    engine.kb.add_files([demo_file()])
    answer = engine.answer("How long does standard shipping take?")
    assert answer.mode == "faq" and answer.sources[0].startswith("shipping")
    assert engine.answer("What's the capital of France?").mode == "handoff"
