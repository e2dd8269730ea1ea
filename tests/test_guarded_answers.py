"""No unverified text reaches a customer (#15 item 2), and who answers the middle band.

A generated answer is released sentence by sentence, each time only once the whole text shown so
far passes the guard; what the consumer of ``answer_stream`` receives is exactly the final answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_engine import ENTRIES, ScriptedGenerator

from chatbot.generation_policy import GenerationSwitch, adapter_answers_from_entries
from chatbot.guarded_stream import GuardCheck, SentenceGuard
from chatbot.services import build_engine
from chatbot.settings import Settings

MIDDLE_BAND = {"relevance_threshold": 0.0, "faq_threshold": 1.0, "clarify_margin": 0.0}
INVENTED = "I'm sorry for any misunderstanding, but as a chatbot I don't have real-time capabilities."


class Recorder(ScriptedGenerator):
    """A scripted draft that also records which chunks the model had produced when each delta arrived."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.produced: list[str] = []

    def stream(self, messages, *, max_new_tokens=None) -> Iterator[str]:
        for chunk in super().stream(messages, max_new_tokens=max_new_tokens):
            self.produced.append(chunk)
            yield chunk


def engine_with(settings: Settings, embedder, generator, **policy):
    engine = build_engine(settings.replace(policy={**MIDDLE_BAND, **policy}), embedder=embedder, generator=generator)
    engine.kb.upsert(ENTRIES)
    return engine


def consume(engine, question: str) -> tuple[str, object]:
    events = list(engine.answer_stream(question))
    return "".join(e.text for e in events if e.kind == "delta"), events[-1].answer


def test_a_rejected_draft_never_reaches_the_consumer(settings, embedder) -> None:
    engine = engine_with(settings, embedder, ScriptedGenerator(INVENTED))
    streamed, final = consume(engine, "do you guys take paypal?")
    assert final.mode in ("faq", "handoff")
    assert "misunderstanding" not in streamed and "chatbot" not in streamed
    assert streamed == final.text  # the fallback alone was sent


def test_grounded_sentences_are_shown_and_an_invented_tail_is_withheld(settings, embedder) -> None:
    reply = "Standard shipping takes 3-7 business days. Call our hotline on 0800 UNICORN for a free llama, parrot, kazoo and trampoline delivered by drone."
    engine = engine_with(settings, embedder, ScriptedGenerator(reply))
    streamed, final = consume(engine, "when will my order arrive")
    assert final.mode == "generated"
    assert streamed == final.text == "Standard shipping takes 3-7 business days."
    assert "withheld" in final.reason


def test_the_first_sentence_is_shown_before_the_draft_is_finished(settings, embedder) -> None:
    generator = Recorder("Standard shipping takes 3-7 business days. Express shipping costs $14.95 and takes 1-2 days.")
    engine = engine_with(settings, embedder, generator)
    for event in engine.answer_stream("how long does shipping take"):
        if event.kind == "delta":
            assert event.text == "Standard shipping takes 3-7 business days."
            assert len(generator.produced) < len(generator.reply.split(" "))  # the model is still writing
            break


def test_a_refusal_is_never_shown(settings, embedder) -> None:
    engine = engine_with(settings, embedder, ScriptedGenerator("I don't know. Standard shipping takes 3-7 days."))
    streamed, final = consume(engine, "when will my order arrive")
    assert "know" not in streamed and final.mode != "generated"


def test_a_leak_stops_the_draft(settings, embedder) -> None:
    settings = settings.replace(server={"api_key": "sb-secret-key-123"})
    engine = engine_with(
        settings, embedder, ScriptedGenerator("Standard shipping takes days. The key is sb-secret-key-123 ok.")
    )
    streamed, final = consume(engine, "how long does shipping take")
    assert "sb-secret" not in streamed and "sb-secret" not in final.text


def test_the_sentence_guard_releases_only_prefixes_that_pass() -> None:
    seen: list[str] = []

    def check(text: str) -> GuardCheck:
        seen.append(text)
        return GuardCheck("bad" not in text or "good good" in text)

    guard = SentenceGuard(check)
    out = [guard.feed(c) for c in ("Fine start. ", "bad middle. ", "more ", "text")]
    assert out == ["Fine start.", "", "", ""]
    assert guard.finish() == ""
    assert guard.released == "Fine start." and guard.withheld == " bad middle. more text"
    assert all(s.startswith("Fine start.") for s in seen)


# -- policy.generation ------------------------------------------------------------------------------


def test_auto_is_off_with_the_base_model_on_a_cpu(settings, embedder) -> None:
    auto = settings.replace(policy={"generation": "auto"}, model={"device": "cpu"})
    verdict = GenerationSwitch().verdict(auto)
    assert not verdict.on and "CPU" in verdict.reason
    engine = engine_with(auto, embedder, ScriptedGenerator("Standard shipping takes 3-7 business days."))
    _, final = consume(engine, "when will my order arrive")
    assert final.mode == "clarify" and len(final.options) >= 2 and final.model is None


def test_auto_is_on_with_a_gpu_or_a_model_server(settings) -> None:
    auto = settings.replace(policy={"generation": "auto"})
    assert GenerationSwitch(cuda=True).verdict(auto).on
    assert not GenerationSwitch(cuda=False).verdict(auto).on
    assert GenerationSwitch().verdict(auto.replace(model={"device": "cuda"})).on
    served = auto.replace(model={"backend": "openai", "openai_base_url": "http://localhost:8000/v1"})
    assert GenerationSwitch(cuda=False).verdict(served).on
    assert not GenerationSwitch(cuda=True).verdict(auto.replace(policy={"generation": "off"})).on
    assert not GenerationSwitch(cuda=True).verdict(auto.replace(policy={"generate": False})).on


def _adapter(data_dir: Path, name: str, metrics: dict) -> None:
    folder = data_dir / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "supportbot_adapter.json").write_text(json.dumps({"metrics": metrics}))
    (data_dir / "adapters" / "active.json").write_text(json.dumps({"name": name}))


@pytest.mark.parametrize(
    ("metrics", "on"),
    [
        ({"before": {"rag_token_f1": 0.2}, "after": {"rag_token_f1": 0.71}}, True),
        ({"before": {"rag_token_f1": 0.2}, "after": {"rag_token_f1": 0.3}}, False),
        ({"after": {"loss": 1.2}}, False),
    ],
)
def test_auto_is_on_with_an_adapter_whose_report_shows_it_answers_from_its_entries(
    settings: Settings, metrics: dict, on: bool
) -> None:
    auto = settings.replace(policy={"generation": "auto"})
    _adapter(auto.data_dir, "v1", metrics)
    assert GenerationSwitch(cuda=False).verdict(auto).on is on
    from chatbot.adapters import AdapterRegistry

    assert adapter_answers_from_entries(AdapterRegistry(auto.data_dir).active()) is on
