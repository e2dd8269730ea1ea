"""Large uploads: searchable once their phrasings are embedded, whole-entry vectors in the background."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GatedEmbedder, HashingEmbedder

from knowledge_base.kb import KnowledgeBase
from knowledge_base.settings import KBSettings

FAQ = [
    ("ship", "How long does shipping take?", "Standard shipping takes 3-7 business days after dispatch."),
    ("express", "How much is express delivery?", "Express delivery costs $14.95 and arrives in 1-2 days."),
    ("return", "How do I return an item?", "Start a return from Account > Orders within 30 days."),
    ("pay", "Which payment methods do you accept?", "We accept Visa, Mastercard, PayPal and gift cards."),
    ("track", "Where is my parcel?", "Follow it with the tracking link in your shipping e-mail."),
]
QUERIES = ["when does my order arrive", "paying with paypal", "send something back", "tracking link", "1-2 days"]
BACKGROUND = KBSettings(background_answers_above=2)
AT_ONCE = KBSettings(background_answers_above=0)


@pytest.fixture
def faq_file(tmp_path: Path) -> Path:
    path = tmp_path / "faq.csv"
    path.write_text("id,question,answer\n" + "".join(f'{i},"{q}","{a}"\n' for i, q, a in FAQ), encoding="utf-8")
    return path


def _rankings(kb: KnowledgeBase) -> list[list[tuple[str, float]]]:
    return [[(h.entry.id, round(h.score, 6)) for h in kb.search(q, 5)] for q in QUERIES]


def _answer_vectors(kb: KnowledgeBase) -> dict[str, str]:
    assert kb.dense is not None
    return {k.entry_id: k.text_hash for k in kb.dense.keys.values() if k.kind == "a"}


def test_a_large_upload_is_searchable_at_once_and_complete_after_the_fill(tmp_path, faq_file):
    embedder = GatedEmbedder()
    kb = KnowledgeBase(tmp_path / "kb", BACKGROUND, embedder)
    report = kb.add_files([faq_file])
    assert report.answers_pending == len(FAQ) and report.to_dict()["answers_pending"] == len(FAQ)
    assert _answer_vectors(kb) == {}
    # Meanwhile entries are ranked by their phrasings alone, exactly like with no answer vectors.
    phrasings_only = KnowledgeBase(tmp_path / "q", KBSettings(answer_weight=0), HashingEmbedder())
    phrasings_only.add_files([faq_file])
    assert _rankings(kb) == _rankings(phrasings_only)
    embedder.gate.set()
    kb.wait_for_answers()
    at_once = KnowledgeBase(tmp_path / "sync", AT_ONCE, HashingEmbedder())
    assert at_once.add_files([faq_file]).answers_pending == 0
    assert _rankings(kb) == _rankings(at_once) and _answer_vectors(kb) == _answer_vectors(at_once)
    assert kb.stats()["answers_pending"] == 0
    kb.close()
    assert _rankings(KnowledgeBase(tmp_path / "kb", BACKGROUND, HashingEmbedder())) == _rankings(at_once)


def test_edits_and_removals_during_the_fill_are_not_undone_by_it(tmp_path, faq_file):
    embedder = GatedEmbedder()
    kb = KnowledgeBase(tmp_path / "kb", BACKGROUND, embedder)
    kb.add_files([faq_file])
    kb.update("ship", answer="Standard shipping now takes 2-4 business days.")  # indexed whole, at once
    kb.delete(["pay"])
    embedder.gate.set()
    kb.wait_for_answers()
    at_once = KnowledgeBase(tmp_path / "sync", AT_ONCE, HashingEmbedder())
    at_once.add_files([faq_file])
    at_once.update("ship", answer="Standard shipping now takes 2-4 business days.")
    at_once.delete(["pay"])
    assert _answer_vectors(kb) == _answer_vectors(at_once) and "pay" not in _answer_vectors(kb)
    assert _rankings(kb) == _rankings(at_once)


def test_a_fill_stopped_by_close_resumes_at_the_next_open(tmp_path, faq_file, monkeypatch):
    monkeypatch.setattr(KnowledgeBase, "ANSWER_CHUNK", 1)  # one entry a round
    embedder = GatedEmbedder()
    kb = KnowledgeBase(tmp_path / "kb", BACKGROUND, embedder)
    kb.add_files([faq_file])
    assert embedder.waiting.wait(10)  # the first round is under way
    kb._closing.set()  # as close() does: the round under way finishes, no other starts
    embedder.gate.set()
    kb.close()
    assert 0 < len(_answer_vectors(kb)) < len(FAQ)  # saved with some whole-entry vectors missing
    reopened = KnowledgeBase(tmp_path / "kb", BACKGROUND, HashingEmbedder())
    reopened.wait_for_answers()
    at_once = KnowledgeBase(tmp_path / "sync", AT_ONCE, HashingEmbedder())
    at_once.add_files([faq_file])
    assert _answer_vectors(reopened) == _answer_vectors(at_once) and _rankings(reopened) == _rankings(at_once)


def test_without_background_uploads_and_an_unfinished_fill_complete_before_returning(tmp_path, faq_file):
    embedder = GatedEmbedder()
    kb = KnowledgeBase(tmp_path / "kb", BACKGROUND, embedder)
    kb.add_files([faq_file])  # the fill waits at the gate: the index is saved without answer vectors
    assert embedder.waiting.wait(10)
    kb._closing.set()
    kb.flush()
    # A command opening it meanwhile (as the CLI does: background=False) completes the fill first.
    command = KnowledgeBase(tmp_path / "kb", BACKGROUND, HashingEmbedder(), background=False)
    assert command.stats()["answers_pending"] == 0 and len(_answer_vectors(command)) == len(FAQ)
    other = KnowledgeBase(tmp_path / "other", BACKGROUND, HashingEmbedder(), background=False)
    assert other.add_files([faq_file]).answers_pending == 0 and len(_answer_vectors(other)) == len(FAQ)
    embedder.gate.set()


def test_small_uploads_and_the_setting_zero_embed_everything_before_returning(tmp_path, faq_file):
    kb = KnowledgeBase(tmp_path / "kb", KBSettings(background_answers_above=len(FAQ)), HashingEmbedder())
    assert kb.add_files([faq_file]).answers_pending == 0 and len(_answer_vectors(kb)) == len(FAQ)
    assert KBSettings(background_answers_above=-1).problems()
