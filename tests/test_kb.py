"""The knowledge base: storage, incremental indexes, rebuilds, retrieval (with a fake embedder)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import HashingEmbedder

from knowledge_base.entry import FAQEntry
from knowledge_base.errors import IngestError, NotFoundError
from knowledge_base.index import DenseIndex, LexicalIndex
from knowledge_base.kb import KnowledgeBase
from knowledge_base.lc_retriever import FAQRetriever
from knowledge_base.settings import KBSettings

FAQ_CSV = """id,category,question,alt_questions,answer
ship-1,shipping,How long does shipping take?,When will my order arrive?,Standard shipping takes 3-7 business days.
ship-2,shipping,How much does express shipping cost?,,Express shipping costs $14.95 and takes 1-2 days.
ret-1,returns,How do I return an item?,Can I send something back?,Start a return from Account > Orders within 30 days.
pay-1,payments,Which payment methods do you accept?,,We accept Visa, Mastercard, PayPal and gift cards.
"""


@pytest.fixture
def faq_file(tmp_path: Path) -> Path:
    path = tmp_path / "faq.csv"
    path.write_text(FAQ_CSV, encoding="utf-8")
    return path


@pytest.fixture
def kb(tmp_path: Path, embedder) -> KnowledgeBase:
    return KnowledgeBase(tmp_path / "kb", KBSettings(), embedder)


def _ranking(kb: KnowledgeBase, query: str) -> list[tuple[str, float]]:
    return [(h.entry.id, round(h.score, 5)) for h in kb.search(query, 10)]


def test_upload_adds_entries_and_every_phrasing_is_searchable(kb, faq_file):
    report = kb.add_files([faq_file])
    assert (report.added, report.updated, report.unchanged, report.total) == (4, 0, 0, 4)
    assert kb.search("When will my order arrive?", 1)[0].entry.id == "ship-1"
    hit = kb.search("can i send something back", 1)[0]
    assert hit.entry.id == "ret-1"
    assert hit.matched == "Can I send something back?"


def test_uploading_the_same_file_twice_changes_nothing(kb, faq_file, embedder):
    kb.add_files([faq_file])
    embedded = embedder.texts_embedded
    revision = kb.revision
    report = kb.add_files([faq_file])
    assert report.to_dict() == {"added": 0, "updated": 0, "unchanged": 4, "total": 4}
    assert embedder.texts_embedded == embedded
    assert kb.revision == revision


def test_entries_without_id_get_a_content_id_and_reupload_is_idempotent(kb, tmp_path):
    path = tmp_path / "noid.csv"
    path.write_text("question,answer\nDo you ship abroad?,Yes to Canada and the EU.\n", encoding="utf-8")
    assert kb.add_files([path]).added == 1
    assert kb.add_files([path]).to_dict() == {"added": 0, "updated": 0, "unchanged": 1, "total": 1}
    assert kb.entries()[0].id.startswith("faq-")


def test_same_id_reuploaded_updates_in_place_and_embeds_only_the_change(kb, faq_file, tmp_path, embedder):
    kb.add_files([faq_file])
    before = embedder.texts_embedded
    changed = tmp_path / "changed.csv"
    changed.write_text(FAQ_CSV.replace("$14.95", "$15.95"), encoding="utf-8")
    report = kb.add_files([changed])
    assert (report.added, report.updated, report.unchanged) == (0, 1, 3)
    # only ship-2's whole-entry text changed; its question vector comes from the cache
    assert embedder.texts_embedded - before == 1
    assert "$15.95" in kb.get("ship-2").answer


def test_a_bad_file_stores_nothing(kb, faq_file, tmp_path):
    kb.add_files([faq_file])
    bad = tmp_path / "bad.csv"
    bad.write_text("id,question,answer\nx-1,New question?,\nx-2,,Some answer\n", encoding="utf-8")
    with pytest.raises(IngestError) as err:
        kb.add_files([faq_file, bad])
    assert len(err.value.problems) == 2
    assert all("bad.csv" in p.where for p in err.value.problems)
    assert len(kb) == 4


def test_skip_bad_rows_stores_the_good_ones_and_reports_the_rest(kb, tmp_path):
    bad = tmp_path / "mixed.csv"
    bad.write_text("id,question,answer\nx-1,Good question?,Good answer.\nx-2,,Some answer\n", encoding="utf-8")
    report = kb.add_files([bad], skip_bad_rows=True)
    assert report.added == 1
    assert [p.where for p in report.skipped] == ["mixed.csv:3"]


def test_incremental_updates_rank_exactly_like_a_full_rebuild(kb, faq_file, tmp_path, embedder):
    kb.add_files([faq_file])
    kb.update("ship-1", answer="Standard shipping takes 2-5 business days.", alt_questions=["Where is my parcel?"])
    kb.add_phrasing("pay-1", "can I pay with apple pay")
    kb.update("ret-1", enabled=False)
    kb.delete(["ship-2"])
    queries = ["where is my parcel", "apple pay", "return item", "express shipping price", "shipping time"]
    incremental = [_ranking(kb, q) for q in queries]
    fresh = KnowledgeBase(tmp_path / "kb", KBSettings(), embedder)
    fresh.reindex()
    assert [_ranking(fresh, q) for q in queries] == incremental
    assert all(entry_id != "ret-1" for ranking in incremental for entry_id, _ in ranking)


def test_a_large_upload_is_indexed_in_chunks_exactly_like_at_once(faq_file, tmp_path, embedder, monkeypatch):
    queries = ["where is my parcel", "apple pay", "return item", "express shipping price"]
    whole = KnowledgeBase(tmp_path / "whole", KBSettings(), embedder)
    whole.add_files([faq_file])
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(KnowledgeBase, "INDEX_CHUNK", 1)
    chunked = KnowledgeBase(tmp_path / "chunked", KBSettings(), embedder, progress=lambda s, d, t: seen.append((d, t)))
    chunked.add_files([faq_file])
    assert [_ranking(chunked, q) for q in queries] == [_ranking(whole, q) for q in queries]
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1][0] == seen[-1][1] == len(chunked.dense)


def test_indexes_out_of_step_with_sqlite_are_rebuilt_at_open(kb, faq_file, tmp_path, embedder):
    kb.add_files([faq_file])
    expected = _ranking(kb, "how long is delivery")
    # A crash after the SQLite commit but before the index files were replaced: stale indexes.
    stale = (tmp_path / "kb" / KnowledgeBase.DENSE_FILE).read_bytes()
    kb.update("ship-1", answer="Standard shipping takes 2-5 business days.")
    (tmp_path / "kb" / KnowledgeBase.DENSE_FILE).write_bytes(stale)
    reopened = KnowledgeBase(tmp_path / "kb", KBSettings(), embedder)
    assert reopened.search("how long is delivery", 1)[0].entry.answer.startswith("Standard shipping takes 2-5")
    assert [e for e, _ in _ranking(reopened, "how long is delivery")] == [e for e, _ in expected]


class RecordingEmbedder(HashingEmbedder):
    """The fake embedder, remembering every text it embedded."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def embed_batch(self, texts):
        self.seen.extend(texts)
        return super().embed_batch(texts)


def test_the_whole_entry_vector_embeds_only_the_first_answer_tokens(tmp_path):
    recorder = RecordingEmbedder()
    kb = KnowledgeBase(tmp_path / "kb", KBSettings(answer_tokens=12), recorder)
    long_answer = "Returns are free within 30 days.\n" + " ".join(f"clause{i}" for i in range(200))
    kb.upsert([FAQEntry("ret", "How do I return an item?", long_answer), FAQEntry("pay", "Do you take cash?", "No.")])
    # The fake embedder counts words: question (6) + the answer's first 6 words, newline kept.
    assert "How do I return an item?\nReturns are free within 30 days." in recorder.seen
    assert "Do you take cash?\nNo." in recorder.seen  # shorter than the limit: whole
    assert not any("clause0" in text for text in recorder.seen)
    assert kb.search("return an item", 1)[0].entry.answer == long_answer  # the answer itself is whole


def test_changing_answer_tokens_rebuilds_the_dense_index_re_embedding_only_the_answers(tmp_path, faq_file):
    first = RecordingEmbedder()
    KnowledgeBase(tmp_path / "kb", KBSettings(answer_tokens=8), first).add_files([faq_file])
    again = RecordingEmbedder()
    KnowledgeBase(tmp_path / "kb", KBSettings(answer_tokens=8), again)
    assert again.seen == []  # same recipe: the saved index is used as it is
    changed = RecordingEmbedder()
    reopened = KnowledgeBase(tmp_path / "kb", KBSettings(answer_tokens=0), changed)
    assert sorted(changed.seen) == sorted(f"{e.question}\n{e.answer}" for e in reopened.store.all())
    assert reopened.search("express shipping cost", 1)[0].entry.id == "ship-2"


def test_default_truncation_counts_words_and_keeps_the_text_as_written():
    embedder = HashingEmbedder()
    text = "Where  is\nmy parcel?  It ships today."
    assert embedder.truncate([text, "short"], 3) == ["Where  is\nmy", "short"]
    assert embedder.truncate([text], 7) == [text]


def test_a_damaged_index_file_is_rebuilt_not_trusted(kb, faq_file, tmp_path, embedder):
    kb.add_files([faq_file])
    (tmp_path / "kb" / KnowledgeBase.DENSE_FILE).write_bytes(b"garbage")
    (tmp_path / "kb" / KnowledgeBase.LEXICAL_FILE).write_text("{not json", encoding="utf-8")
    reopened = KnowledgeBase(tmp_path / "kb", KBSettings(), embedder)
    assert reopened.search("return an item", 1)[0].entry.id == "ret-1"


def test_a_killed_reindex_leaves_a_loadable_knowledge_base(kb, faq_file, tmp_path, embedder, monkeypatch):
    kb.add_files([faq_file])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed in the middle of writing the new index

    monkeypatch.setattr(LexicalIndex, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        kb.reindex()
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "kb").iterdir() if p.name.endswith(".tmp")]
    reopened = KnowledgeBase(tmp_path / "kb", KBSettings(), embedder)
    assert reopened.search("return an item", 1)[0].entry.id == "ret-1"


def test_scores_are_in_unit_range_and_best_first(kb, faq_file):
    kb.add_files([faq_file])
    hits = kb.search("how long does shipping take", 4)
    assert hits[0].entry.id == "ship-1"
    assert all(0.0 <= h.score <= 1.0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_category_filter(kb, faq_file):
    kb.add_files([faq_file])
    hits = kb.search("shipping", 5, category="returns")
    assert [h.entry.id for h in hits] == ["ret-1"]


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_each_ranking_mode_finds_an_exact_question(kb, faq_file, mode):
    kb.add_files([faq_file])
    assert kb.search("Which payment methods do you accept?", 3, mode=mode)[0].entry.id == "pay-1"


def test_hybrid_lets_a_shared_rare_word_break_a_dense_near_tie(tmp_path, embedder):
    settings = KBSettings(bm25_weight=0.5)
    kb = KnowledgeBase(tmp_path / "kb", settings, embedder)
    kb.upsert(
        [
            FAQEntry("a", "How do I reset my password?", "Use the reset link."),
            FAQEntry("b", "How do I reset my router?", "Unplug it."),
        ]
    )
    assert kb.search("router", 1)[0].entry.id == "b"


def test_bm25_gets_no_say_when_it_scores_the_candidates_alike(tmp_path, embedder):
    kb = KnowledgeBase(tmp_path / "kb", KBSettings(bm25_weight=0.5), embedder)
    kb.upsert(
        [
            FAQEntry("a", "How do I reset my password?", "Use the reset link."),
            FAQEntry("b", "How do I reset my router?", "Unplug it."),
        ]
    )
    # "reset" is in both entries alike: the hybrid score is the dense score.
    for hit in kb.search("reset", 2):
        assert hit.lexical > 0 and hit.score == pytest.approx(hit.dense)
    # "router" singles out one entry: BM25 adds to its score, by at most bm25_weight.
    top = kb.search("router", 1)[0]
    assert top.score == pytest.approx(0.5 * top.dense + 0.5 * top.lexical)


def test_lexical_scores_are_normalized_by_what_the_query_could_reach():
    index = LexicalIndex()
    index.add("a", "express shipping cost")
    index.add("b", "gift card balance")
    scores = index.scores("express shipping cost")
    assert 0.5 < scores["a"] <= 1.0
    assert "b" not in scores
    assert index.scores("express xylophone")["a"] < scores["a"]


def test_lexical_index_scores_like_the_bm25_formula_after_adds_and_removes(tmp_path):
    import math
    import random

    from knowledge_base.index import tokenize

    rng = random.Random(3)
    words = ["parcel", "refund", "voucher", "express", "invoice", "colour", "size", "warranty", "courier", "label"]
    index = LexicalIndex()
    texts = {}
    for i in range(60):
        texts[f"e{i}"] = " ".join(rng.choices(words, k=rng.randint(2, 9)))
        index.add(f"e{i}", texts[f"e{i}"])
    for i in range(0, 60, 3):  # removed rows are reused by later adds
        index.remove(f"e{i}")
        del texts[f"e{i}"]
    for i in range(60, 70):
        texts[f"e{i}"] = " ".join(rng.choices(words, k=rng.randint(2, 9)))
        index.add(f"e{i}", texts[f"e{i}"])
    index.save(tmp_path / "bm25.json", revision=1)
    loaded, _ = LexicalIndex.load(tmp_path / "bm25.json")

    query = "express courier refund"
    docs = {e: tokenize(t) for e, t in texts.items()}
    avg = sum(map(len, docs.values())) / len(docs)
    idf = {
        t: math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for t in tokenize(query)
        for df in [sum(t in d for d in docs.values())]
    }
    expected = {}
    for e, d in docs.items():
        raw = sum(idf[t] * d.count(t) * 2.2 / (d.count(t) + 1.2 * (0.25 + 0.75 * len(d) / avg)) for t in idf if t in d)
        if raw:
            expected[e] = min(raw / sum(idf.values()), 1.0)
    for scored in (index.scores(query), loaded.scores(query)):
        assert scored.keys() == expected.keys()
        assert all(scored[e] == pytest.approx(v) for e, v in expected.items())

    best3 = sorted(expected, key=expected.__getitem__, reverse=True)[:3]
    weakest = min(expected, key=expected.__getitem__)
    limited = index.scores(query, top=3, include=[weakest, "e0", "nope"])
    assert set(limited) == {*best3, weakest}
    assert index.scores(query, allowed={"e1", "e2"}).keys() == expected.keys() & {"e1", "e2"}


def test_dense_index_round_trips_through_disk(tmp_path):
    from knowledge_base.index import VectorKey

    index = DenseIndex(4)
    vectors = np.eye(4, dtype=np.float32)
    index.add([VectorKey(f"e{i}", "q", f"h{i}") for i in range(4)], vectors)
    index.remove_entries(["e1"])
    index.save(tmp_path / "d.npz", revision=7, model="m")
    loaded, revision, model = DenseIndex.load(tmp_path / "d.npz")
    assert (revision, model, len(loaded)) == (7, "m", 3)
    assert loaded.search(vectors[2], 1)[0][1] == pytest.approx(1.0)
    assert loaded.search(vectors[2], 1)[0][0] == index.search(vectors[2], 1)[0][0]  # same vector ids

    # Files of the first release held a serialized FAISS index: they still load.
    meta = np.frombuffer(
        json.dumps({"revision": 7, "model": "m", "dim": 4, "next": 4, "keys": [[2, "e2", "q", "h2"]]}).encode(),
        dtype=np.uint8,
    )
    old = DenseIndex(4)
    old.add([VectorKey("x", "q", "h"), VectorKey("x", "q", "h1"), VectorKey("e2", "q", "h2")], vectors[:3])
    old.remove_entries(["x"])
    np.savez(tmp_path / "old.npz", index=faiss.serialize_index(old.index), meta=meta)
    legacy, _, _ = DenseIndex.load(tmp_path / "old.npz")
    assert legacy.search(vectors[2], 1) == [(2, pytest.approx(1.0))]

    DenseIndex(4).save(tmp_path / "empty.npz", revision=0, model="m")
    assert len(DenseIndex.load(tmp_path / "empty.npz")[0]) == 0
    assert loaded.keys[loaded.search(vectors[2], 1)[0][0]].entry_id == "e2"


def test_saves_after_changes_write_what_is_in_memory_now(tmp_path):
    """Both indexes keep each entry's saved text between saves: a later save must still write
    exactly the current entries (removed ones gone, re-added ones with their new content)."""
    from knowledge_base.index import VectorKey

    dense, lexical = DenseIndex(4), LexicalIndex()
    vectors = np.eye(4, dtype=np.float32)
    dense.add([VectorKey(f"e{i}", "q", f"h{i}") for i in range(3)], vectors[:3])
    for i in range(3):
        lexical.add(f"e{i}", f"how do I ship parcel number {i}")
    dense.save(tmp_path / "d.npz", revision=1, model="m")
    lexical.save(tmp_path / "l.json", revision=1)
    dense.remove_entries(["e1"])
    dense.add([VectorKey("e1", "q", "changed"), VectorKey("e3", "a", "new")], vectors[1:3])
    lexical.remove("e0")
    lexical.add("e1", "refunds for the café order")  # replaced, non-ASCII included
    lexical.add("e3", "a new entry")
    dense.save(tmp_path / "d.npz", revision=2, model="m")
    lexical.save(tmp_path / "l.json", revision=2)
    loaded_dense, revision, _ = DenseIndex.load(tmp_path / "d.npz")
    loaded_lexical, _ = LexicalIndex.load(tmp_path / "l.json")
    assert revision == 2 and loaded_dense.keys == dense.keys
    assert loaded_lexical.docs == lexical.docs and "e0" not in loaded_lexical.docs
    assert loaded_lexical.scores("café refunds") == lexical.scores("café refunds")


def test_editing_unknown_entry_names_the_fix(kb):
    with pytest.raises(NotFoundError) as err:
        kb.update("nope", answer="x")
    assert "kb list" in err.value.fix


def test_empty_knowledge_base_returns_nothing(kb):
    assert kb.search("anything") == []
    assert kb.search("   ") == []


def test_langchain_retriever_returns_documents(kb, faq_file):
    kb.add_files([faq_file])
    docs = FAQRetriever(kb=kb, k=2).invoke("how do I return an item")
    assert docs[0].metadata["id"] == "ret-1"
    assert docs[0].page_content.startswith("Q: How do I return an item?")
    assert FAQRetriever(kb=kb, k=2, min_score=0.999).invoke("zzz qqq") == []


def test_stats_and_export(kb, faq_file, tmp_path):
    kb.add_files([faq_file])
    stats = kb.stats()
    assert stats["entries"] == 4
    assert stats["categories"] == {"payments": 1, "returns": 1, "shipping": 2}
    assert kb.export(tmp_path / "out.jsonl") == 4
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 4


def test_embed_batches_by_length_but_returns_rows_in_input_order(embedder):
    texts = ["a much longer question about returning a sale item " * 3, "short", "medium length text", "x"]
    batched = embedder.embed(texts, batch_size=2)
    assert np.allclose(batched, np.vstack([embedder.embed_batch([t]) for t in texts]))


def _st_folder(tmp_path, modules, pooling):
    (tmp_path / "1_Pooling").mkdir(parents=True)
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return tmp_path


@pytest.mark.parametrize(
    ("extra", "pooling", "expected"),
    [
        ([], {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
        (["Normalize"], {"pooling_mode_cls_token": True}, "cls"),
        (["Normalize"], {"pooling_mode_max_tokens": True}, None),  # left to sentence-transformers
        (["Dense", "Normalize"], {"pooling_mode_mean_tokens": True}, None),
    ],
)
def test_which_sentence_transformers_folders_run_without_it(tmp_path, extra, pooling, expected):
    from knowledge_base.embeddings import _pooling_of

    kinds = ["Transformer", "Pooling", *extra]
    modules = [
        {"idx": i, "path": "1_Pooling" if k == "Pooling" else "", "type": f"sentence_transformers.models.{k}"}
        for i, k in enumerate(kinds)
    ]
    assert _pooling_of(_st_folder(tmp_path, modules, pooling)) == expected
    assert _pooling_of(tmp_path / "missing") is None


@pytest.mark.slow
def test_the_default_embedder_gives_sentence_transformers_vectors_without_it():
    from knowledge_base.embeddings import MeanPoolingEmbedder, SentenceTransformerEmbedder, make_embedder

    texts = ["How do I track my order?", "ok", "Can I return an item I bought on sale? " * 40]
    ours = make_embedder(KBSettings())
    assert isinstance(ours, MeanPoolingEmbedder) and ours.name == SentenceTransformerEmbedder().name
    assert np.allclose(ours.embed(texts), SentenceTransformerEmbedder().embed(texts), atol=1e-5)
    cut = ours.truncate(texts, 8)
    assert cut[:2] == texts[:2] and texts[2].startswith(cut[2])  # a prefix, as written
    tokenizer = ours._load()[0]
    assert len(tokenizer(cut[2], add_special_tokens=False)["input_ids"]) == 8
    assert SentenceTransformerEmbedder().truncate(texts, 8) == cut


@pytest.mark.slow
def test_real_minilm_ranks_a_paraphrase_first(tmp_path):
    from knowledge_base.embeddings import make_embedder

    kb = KnowledgeBase(tmp_path / "kb", KBSettings(), make_embedder(KBSettings()))
    kb.upsert(
        [
            FAQEntry("ship", "How long does delivery take?", "Standard delivery takes 3-7 business days."),
            FAQEntry("pay", "Which payment methods do you accept?", "Visa, Mastercard and PayPal."),
        ]
    )
    hits = kb.search("when will my parcel get here", 2)
    assert hits[0].entry.id == "ship"
    assert hits[0].score > hits[1].score + 0.1
