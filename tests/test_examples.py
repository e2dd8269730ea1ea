"""Labelled examples and learned phrasings: every resolution path writes one example, a positive
one is searchable at once as a learned phrasing of its entry and leaves with it (fake embedder)."""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_cli import run as run  # the CLI fixture
from test_engine import ENTRIES, ScriptedGenerator

from chatbot import learning
from chatbot.services import build_engine
from knowledge_base.entry import FAQEntry
from knowledge_base.errors import IngestError, NotFoundError
from knowledge_base.kb import KnowledgeBase
from knowledge_base.settings import KBSettings

CRACKED = "my blender arrived cracked"


def open_kb(folder: Path, embedder: Any, **settings: Any) -> KnowledgeBase:
    kb = KnowledgeBase(folder, KBSettings(**settings), embedder, background=False)
    if not len(kb):
        kb.upsert(
            [
                *ENTRIES,
                FAQEntry("refund", "How do I get my money back?", "Refunds reach your card within 5 days."),
            ]
        )
    return kb


def top(kb: KnowledgeBase, query: str) -> tuple[str, str]:
    """The best entry and the phrasing it matched by."""
    hit = kb.search(query, 3)[0]
    return hit.entry.id, hit.matched


@pytest.fixture
def kb(tmp_path: Path, embedder: Any) -> Any:
    kb = open_kb(tmp_path / "kb", embedder)
    yield kb
    kb.close()


# -- the knowledge base: learned phrasings -------------------------------------------------------


def test_a_positive_example_is_searchable_at_once_and_leaves_with_it(kb: KnowledgeBase) -> None:
    assert top(kb, CRACKED)[1] != CRACKED
    example = kb.learn(CRACKED, "refund", source="api", conversation_id="c1", message_id=7)
    assert (example.entry_id, example.source, example.positive, example.message_id) == ("refund", "api", True, 7)
    assert top(kb, CRACKED) == ("refund", CRACKED)  # learned phrasings rank like authored ones
    assert kb.learned_questions("refund") == [CRACKED]
    assert kb.get("refund").alt_questions == ()  # kept apart from the authored phrasings
    assert kb.examples(entry_id="refund") == [example]
    assert "blender" in kb.lexical.docs["refund"]  # kb.learned_in_bm25: its words count for BM25 too

    assert kb.forget([example.id]) == 1
    assert "blender" not in kb.lexical.docs["refund"]
    assert top(kb, CRACKED)[1] != CRACKED and kb.learned_questions("refund") == []
    assert kb.examples() == [] and kb.forget([example.id]) == 0


def test_a_negative_example_is_stored_but_adds_no_phrasing(kb: KnowledgeBase) -> None:
    example = kb.learn(CRACKED, "refund", source="thumbs_down", positive=False)
    assert example.positive is False and kb.examples(positive=False) == [example]
    assert kb.learned_questions("refund") == [] and top(kb, CRACKED)[1] != CRACKED


def test_near_duplicates_are_stored_but_add_no_vector(kb: KnowledgeBase) -> None:
    vectors = len(kb.dense or [])
    kb.learn(CRACKED, "refund", source="api")
    kb.learn("My  Blender arrived CRACKED?", "refund", source="api")  # the same text, normalised
    kb.learn("cracked blender arrived my", "refund", source="api")  # same words: cosine 1.0 here
    kb.learn("How do I get my money back", "refund", source="api")  # an authored phrasing
    assert len(kb.examples(entry_id="refund")) == 4
    assert len(kb.learned_questions("refund")) == 1 and len(kb.dense or []) == vectors + 1
    assert kb.stats()["learned_phrasings"] == 1


def test_learned_phrasings_are_capped_per_entry_keeping_the_latest(tmp_path: Path, embedder: Any) -> None:
    kb = open_kb(tmp_path / "kb", embedder, learned_per_entry=2)
    for query in ("the jug is broken", "parcel was crushed in transit", CRACKED):
        kb.learn(query, "refund", source="api")
    assert kb.learned_questions("refund") == [CRACKED, "parcel was crushed in transit"]
    assert len(kb.examples()) == 3  # every example is kept, for training
    kb.forget([kb.examples(text="crushed")[0].id])  # the oldest one comes back under the cap
    assert kb.learned_questions("refund") == [CRACKED, "the jug is broken"]
    kb.close()


def test_with_no_learned_phrasings_examples_are_only_stored(tmp_path: Path, embedder: Any) -> None:
    kb = open_kb(tmp_path / "kb", embedder, learned_per_entry=0, learned_in_bm25=False)
    kb.learn(CRACKED, "refund", source="api")
    assert len(kb.examples()) == 1 and kb.learned_questions("refund") == []
    assert top(kb, CRACKED)[1] != CRACKED and "blender" not in kb.lexical.docs["refund"]
    assert KBSettings(learned_per_entry=-1).problems()[0].where == "kb.learned_per_entry"
    kb.close()


def test_learned_phrasings_survive_a_restart_and_a_rebuild(
    tmp_path: Path, embedder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kb = open_kb(tmp_path / "kb", embedder)
    kb.learn(CRACKED, "refund", source="api")
    kb.close()
    with caplog.at_level(logging.WARNING):
        kb = open_kb(tmp_path / "kb", embedder)
    assert "rebuilding" not in caplog.text  # loaded from the saved index, which has them
    assert kb.learned_questions("refund") == [CRACKED] and top(kb, CRACKED) == ("refund", CRACKED)
    kb.close()
    (tmp_path / "kb" / KnowledgeBase.DENSE_FILE).unlink()  # the database is the truth
    kb = open_kb(tmp_path / "kb", embedder)
    assert kb.learned_questions("refund") == [CRACKED] and top(kb, CRACKED) == ("refund", CRACKED)
    assert kb.reindex()["vectors"] == len(kb.dense or []) and kb.learned_questions("refund") == [CRACKED]
    kb.close()


def test_editing_an_entry_keeps_its_learned_phrasings_and_deleting_it_removes_them(kb: KnowledgeBase) -> None:
    kb.learn(CRACKED, "refund", source="api")
    kb.learn("parcel was crushed", "return", source="api")
    kb.update("refund", answer="Refunds reach your card within 3 days.")
    assert kb.learned_questions("refund") == [CRACKED] and top(kb, CRACKED)[0] == "refund"
    kb.delete(["refund"])
    assert kb.examples(entry_id="refund") == [] and len(kb.examples()) == 1
    assert all(key.entry_id != "refund" for key in (kb.dense.keys.values() if kb.dense else []))
    assert top(kb, CRACKED)[1] != CRACKED


def test_a_version_1_database_is_migrated_in_place(tmp_path: Path, embedder: Any) -> None:
    kb = open_kb(tmp_path / "kb", embedder)
    kb.close()
    with sqlite3.connect(tmp_path / "kb" / "kb.sqlite3") as conn:  # as SupportBot 0.1 left it
        conn.execute("DROP TABLE examples")
        conn.execute("PRAGMA user_version=1")
    kb = open_kb(tmp_path / "kb", embedder)
    assert len(kb) == len(ENTRIES) + 1 and kb.learn(CRACKED, "refund", source="api").id == 1
    kb.close()


def test_bad_examples_are_refused_with_the_fix(kb: KnowledgeBase) -> None:
    with pytest.raises(NotFoundError, match="no FAQ entry"):
        kb.learn(CRACKED, "nope", source="api")
    with pytest.raises(IngestError, match="unknown source"):
        kb.learn(CRACKED, "refund", source="guess")
    with pytest.raises(IngestError, match="empty"):
        kb.learn("   ", "refund", source="api")
    with pytest.raises(IngestError) as caught:  # all or nothing
        kb.learn_many([(CRACKED, "refund"), ("where is it", "nope"), ("", "ship")])
    assert [p.where for p in caught.value.problems] == ["row 2", "row 3"]
    assert kb.examples() == []
    learned = kb.learn_many([(CRACKED, "refund"), ("parcel crushed", "return")])
    assert [e.source for e in learned] == ["import", "import"] and len(kb.examples(source="import")) == 2


# -- the chatbot: every resolution path writes one example ---------------------------------------


@pytest.fixture
def engine(settings: Any, embedder: Any) -> Any:
    engine = build_engine(
        settings.replace(policy={"relevance_threshold": 0.0, "clarify_margin": 1.0}),
        embedder=embedder,
        generator=ScriptedGenerator("unused"),
    )
    engine.kb.upsert(ENTRIES)
    yield engine
    engine.store.close()
    engine.kb.close()


def test_a_clicked_clarify_option_labels_the_original_question(engine: Any) -> None:
    asked = engine.answer("shipping question, mail me at jo@example.com")
    assert asked.mode == "clarify" and engine.kb.examples() == []
    option = asked.options[1]
    engine.answer(option["question"], asked.conversation_id)  # what the chat page sends on a click
    [example] = engine.kb.examples()
    assert (example.source, example.entry_id, example.positive) == ("clarify", option["id"], True)
    assert example.query == "shipping question, mail me at [email]"  # redacted before it is stored
    assert (example.conversation_id, example.message_id) == (asked.conversation_id, asked.message_id)

    again = engine.answer("shipping", asked.conversation_id)
    engine.answer("something else entirely", again.conversation_id)  # not one of the options
    assert len(engine.kb.examples()) == 1


def test_thumbs_up_and_down_label_the_cited_entry(engine: Any) -> None:
    engine.settings = engine.settings.replace(policy={"relevance_threshold": 0.0, "clarify_margin": 0.0})
    answer = engine.answer("How do I return an item?")
    assert answer.mode == "faq"
    engine.feedback(answer.message_id, "up")
    engine.feedback(answer.message_id, "up", "great")  # the comment re-sends the rating
    [up] = engine.kb.examples()
    assert (up.source, up.entry_id, up.positive, up.message_id) == ("thumbs_up", "return", True, answer.message_id)
    engine.feedback(answer.message_id, "down")  # a changed mind replaces the label
    [down] = engine.kb.examples()
    assert (down.source, down.positive) == ("thumbs_down", False)
    assert engine.kb.learned_questions("return") == []


def test_a_rating_of_a_handoff_labels_nothing(engine: Any) -> None:
    engine.settings = engine.settings.replace(policy={"relevance_threshold": 1.0})
    answer = engine.answer("How do I return an item?")
    assert answer.mode == "handoff"
    engine.feedback(answer.message_id, "down")
    assert engine.kb.examples() == []


def test_queued_questions_resolved_by_phrasing_or_a_new_entry(engine: Any) -> None:
    store, kb = engine.store, engine.kb
    a = store.add_unanswered(
        "jug arrived in pieces", conversation_id=None, message_id=None, top_score=0.1, reason="handoff"
    )
    b = store.add_unanswered(
        "card is 4111 1111 1111 1111", conversation_id=None, message_id=None, top_score=0.1, reason="handoff"
    )
    resolved, examples = learning.resolve_queue(kb, store, [a], "return", source="phrasing")
    assert resolved == 1 and [(e.query, e.source) for e in examples] == [("jug arrived in pieces", "phrasing")]
    assert top(kb, "jug arrived in pieces") == ("return", "jug arrived in pieces")
    resolved, examples = learning.resolve_queue(kb, store, [b], "giftcard", source="assign")
    assert examples[0].query == "card is [card]" and examples[0].source == "assign"
    with pytest.raises(NotFoundError):
        learning.resolve_queue(kb, store, [a], "nope", source="phrasing")
    assert len(kb.examples()) == 2


def test_a_correction_with_its_entry_and_an_annotation_each_label_once(engine: Any) -> None:
    engine.settings = engine.settings.replace(policy={"relevance_threshold": 0.0, "clarify_margin": 0.0})
    answer = engine.answer("can I pay with a voucher?")
    assert learning.correct_answer(engine.kb, engine.store, answer.message_id, "Yes, at checkout.") is None
    example = learning.correct_answer(
        engine.kb, engine.store, answer.message_id, "Yes, enter it at checkout.", entry_id="giftcard"
    )
    assert example is not None and (example.query, example.source) == ("can I pay with a voucher?", "correction")
    user_turn = engine.store.history(answer.conversation_id)[0]
    annotated = learning.annotate(engine.kb, engine.store, user_turn.id, "giftcard")
    assert (annotated.source, annotated.query, annotated.message_id) == ("annotation", user_turn.text, user_turn.id)
    assert len(engine.kb.examples()) == 2


def test_examples_are_exported_next_to_the_conversations(engine: Any) -> None:
    engine.kb.learn("=cmd()", "return", source="api", conversation_id="c9", message_id=3)
    buffer = io.StringIO()
    assert learning.export_examples_csv(engine.kb, buffer) == 1
    [row] = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert row["query"] == "'=cmd()" and row["entry_id"] == "return" and row["message_id"] == "3"
    assert tuple(row) == learning.EXAMPLE_CSV_COLUMNS


# -- supportbot kb learn -------------------------------------------------------------------------


def test_kb_learn_imports_a_log_or_reports_every_bad_row(run: Any, tmp_path: Path) -> None:
    run("kb", "add", "--demo")
    bad = tmp_path / "log.jsonl"
    bad.write_text(
        '{"query": "my parcel never came", "faq_id": "shipping-003"}\n'
        "not json\n"
        '{"query": "where is it", "faq_id": "no-such-entry"}\n'
        '{"faq_id": "shipping-003"}\n',
        encoding="utf-8",
    )
    code, out, _ = run("kb", "learn", str(bad), "--json")
    assert code == 2
    problems = json.loads(out)["problems"]
    assert [p["where"] for p in problems] == ["log.jsonl:2", "log.jsonl:3", "log.jsonl:4"]
    assert "no-such-entry" in problems[1]["message"] and "kb list" in problems[1]["fix"]
    assert json.loads(run("kb", "stats", "--json")[1])["examples"]["examples"] == 0

    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"query": "my parcel never came", "faq_id": "shipping-003"}\n'
        '{"query": "mail me at jo@example.com about my parcel", "faq_id": "shipping-003"}\n',
        encoding="utf-8",
    )
    code, out, _ = run("kb", "learn", str(good), "--json")
    result = json.loads(out)
    assert code == 0 and result["examples"] == 2 and result["entries"] == 1
    assert result["learned_phrasings_added"] == 2
    listed = json.loads(run("kb", "list", "--json")[1])["entries"]
    learned = next(e for e in listed if e["id"] == "shipping-003")["learned_questions"]
    assert learned == ["mail me at [email] about my parcel", "my parcel never came"]
    stats = json.loads(run("kb", "stats", "--json")[1])
    assert stats["learned_phrasings"] == 2 and stats["examples"]["source:import"] == 2
