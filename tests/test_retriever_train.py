"""Retriever fine-tuning (finetune.retriever), versions (knowledge_base.retrievers) and the swap.

A tiny random BERT with the bundled MiniLM's tokenizer, wrapped as a sentence-transformers model
(mean pooling), stands in for MiniLM: seconds to build and to train a few steps.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from chatbot.services import build_engine, open_knowledge_base
from chatbot.settings import PolicySettings, Settings
from finetune.retriever import (
    RetrieverTrainConfig,
    build_pairs,
    off_topic_questions,
    reranker_decision,
    split_examples,
    train_retriever,
)
from finetune.train import TrainingInterrupted
from knowledge_base.embeddings import MeanPoolingEmbedder
from knowledge_base.entry import FAQEntry
from knowledge_base.errors import ConfigError, SupportBotError
from knowledge_base.index import DenseIndex
from knowledge_base.kb import KnowledgeBase
from knowledge_base.retrievers import RetrieverError, RetrieverRegistry, load_version, serve_version
from tests.conftest import HashingEmbedder

ENTRIES = [
    FAQEntry(
        "refund",
        "How do I get a refund?",
        "Refunds go back to the original payment method within 5 days of the return arriving.",
        alt_questions=("Can I get my money back?", "refund my order please"),
    ),
    FAQEntry(
        "shipping",
        "How long does shipping take?",
        "Standard shipping takes 3-5 business days; express takes one.",
        alt_questions=("when will my parcel arrive", "delivery time"),
    ),
    FAQEntry(
        "password",
        "How do I reset my password?",
        "Use the 'forgot password' link on the sign-in page; the e-mail arrives within minutes.",
        alt_questions=("I can't log in", "forgot my password"),
    ),
    FAQEntry(
        "cancel",
        "Can I cancel my order?",
        "Orders can be cancelled from your account until they are packed.",
        alt_questions=("stop my order", "I changed my mind about my purchase"),
    ),
    FAQEntry(
        "gift",
        "Do you sell gift cards?",
        "Gift cards from 10 to 500 dollars are sold online and never expire.",
        alt_questions=("gift voucher", "present card for a friend"),
    ),
    FAQEntry(
        "hours",
        "When is customer support open?",
        "Support answers Monday to Friday, 8am to 8pm, and Saturday mornings.",
        alt_questions=("opening hours", "what time can I call you"),
    ),
]
EXAMPLES = [
    ("I want my money returned", "refund"),
    ("give me back what I paid", "refund"),
    ("money back for a broken kettle", "refund"),
    ("where is my package", "shipping"),
    ("how many days until it comes", "shipping"),
    ("parcel still not here", "shipping"),
    ("locked out of my account", "password"),
    ("sign in does not work", "password"),
    ("new password needed", "password"),
    ("undo my purchase", "cancel"),
    ("I don't want the order anymore", "cancel"),
    ("call off the order", "cancel"),
    ("voucher for my mum", "gift"),
    ("buy a card as a present", "gift"),
    ("can I phone you on saturday", "hours"),
    ("are you open on weekends", "hours"),
]


def _tiny_sentence_transformer(folder: Path) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from knowledge_base.embeddings import default_embedding_path

    tokenizer = AutoTokenizer.from_pretrained(default_embedding_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    transformer = models.Transformer(str(folder / "bert"), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
    model.save(str(folder / "st"))
    return folder / "st"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two torch threads collapse on this shared 2-core machine when anything else runs (PITFALLS #21)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT sentence-transformers folder (mean pooling, MiniLM's tokenizer)."""
    return _tiny_sentence_transformer(tmp_path_factory.mktemp("tiny-st"))


@pytest.fixture
def tiny_kb(settings: Settings, tiny_st: Path) -> KnowledgeBase:
    kb = KnowledgeBase(settings.data_dir / "kb", settings.kb, MeanPoolingEmbedder(tiny_st, model="tiny"))
    kb.upsert(ENTRIES)
    yield kb
    kb.close()


FAST = RetrieverTrainConfig(
    epochs=4, batch_size=8, learning_rate=5e-4, max_length=32, checkpoint_every=2, reranker="off", warmup_ratio=0.0
)


def _train(kb: KnowledgeBase, settings: Settings, tiny_st: Path, name: str = "v1", **kwargs: object):
    options = {"examples": EXAMPLES, "config": FAST, "base_model": tiny_st, **kwargs}
    return train_retriever(kb, name, data_dir=settings.data_dir, **options)  # type: ignore[arg-type]


# -- data ------------------------------------------------------------------------------------------


def test_pairs_cover_phrasings_learned_questions_and_answers() -> None:
    pairs = build_pairs(ENTRIES[:1], [("money returned", "refund"), ("unknown entry", "nope")])
    kinds = sorted((p.kind, p.anchor) for p in pairs)
    assert kinds == [
        ("answer", "How do I get a refund?"),
        ("learned", "money returned"),
        ("learned_question", "money returned"),
        ("phrasing", "Can I get my money back?"),
        ("phrasing", "refund my order please"),
    ]
    by_kind = {p.kind: p.positive for p in pairs}
    assert by_kind["phrasing"] == f"{ENTRIES[0].question}\n{ENTRIES[0].answer}"
    assert by_kind["answer"] == ENTRIES[0].answer
    assert by_kind["learned_question"] == ENTRIES[0].question


def test_split_holds_out_whole_entries_and_some_examples_never_both() -> None:
    train, by_example, by_entry = split_examples(EXAMPLES, holdout_fraction=0.3, holdout_entries=0.2, seed=1)
    assert sorted(train + by_example + by_entry) == sorted(EXAMPLES)
    held_entries = {e for _, e in by_entry}
    assert len(held_entries) == 1 and not held_entries & {e for _, e in train + by_example}
    assert by_example and {e for _, e in by_example} <= {e for _, e in train}  # each keeps training traffic


def test_off_topic_questions_ship_with_the_package() -> None:
    questions = off_topic_questions()
    assert len(questions) >= 50 and all(q.strip() for q in questions)


def test_bad_config_is_refused_with_every_problem() -> None:
    bad = RetrieverTrainConfig(batch_size=1, reranker="sometimes")
    with pytest.raises(ConfigError) as info:
        train_retriever(None, "x", data_dir=".", config=bad)  # type: ignore[arg-type]
    text = str(info.value)
    assert "--batch-size" in text and "--reranker" in text


# -- the reranker gate -----------------------------------------------------------------------------


def test_reranker_is_on_only_when_it_wins_within_the_latency_bound() -> None:
    assert reranker_decision(0.80, 0.85, 10.0, 11.9)[0] is True
    worse, why = reranker_decision(0.80, 0.80, 10.0, 11.0)
    assert worse is False and "does not beat" in why
    slow, why = reranker_decision(0.80, 0.90, 10.0, 12.5)
    assert slow is False and "too slow" in why
    untrained, why = reranker_decision(0.80, None, 10.0, 30.0)
    assert untrained is False and "not trained" in why


# -- training, versions, activation ---------------------------------------------------------------


def test_fine_tuning_changes_rankings_and_round_trips_save_activate_rollback(
    tiny_kb: KnowledgeBase, settings: Settings, tiny_st: Path
) -> None:
    before = [[h.entry.id for h in tiny_kb.search(q, 6)] for q, _ in EXAMPLES]
    result = _train(tiny_kb, settings, tiny_st)
    report = result.report
    assert report["training"]["steps"] > 0
    assert report["training"]["final_loss"] < report["training"]["first_loss"]
    for split in ("before", "after"):
        assert set(report[split]["by_example"]) >= {"p@1", "hit@5", "mrr@10", "queries"}
    assert report["data"]["heldout_by_entry"] > 0 and report["data"]["heldout_by_example"] > 0
    saved = json.loads((result.path / "report.json").read_text())
    assert saved["after"] == report["after"]

    registry = RetrieverRegistry(settings.data_dir)
    version = registry.activate("v1")
    assert version.active and version.thresholds == result.thresholds
    serve_version(tiny_kb, version, settings.kb, wait=True)
    assert tiny_kb.retriever_version == version.version
    after = [[h.entry.id for h in tiny_kb.search(q, 6)] for q, _ in EXAMPLES]
    assert after != before

    base = MeanPoolingEmbedder(tiny_st, model="tiny")
    assert registry.rollback() is None and registry.active() is None
    serve_version(tiny_kb, None, settings.kb, base=base, wait=True)
    assert tiny_kb.retriever_version is None
    assert [[h.entry.id for h in tiny_kb.search(q, 6)] for q, _ in EXAMPLES] == before


def test_rollback_returns_to_the_previous_version_and_active_one_cannot_be_removed(
    tiny_kb: KnowledgeBase, settings: Settings, tiny_st: Path
) -> None:
    short = {"config": RetrieverTrainConfig(max_steps=1, batch_size=4, max_length=16, reranker="off")}
    _train(tiny_kb, settings, tiny_st, "a", **short)
    _train(tiny_kb, settings, tiny_st, "b", **short)
    registry = RetrieverRegistry(settings.data_dir)
    registry.activate("a")
    registry.activate("b")
    with pytest.raises(RetrieverError, match="active"):
        registry.remove("b")
    assert registry.rollback().name == "a"  # type: ignore[union-attr]
    registry.remove("b")
    assert [v.name for v in registry.list()] == ["a"]
    with pytest.raises(RetrieverError, match="exists"):
        _train(tiny_kb, settings, tiny_st, "a", **short)


def test_thresholds_are_calibrated_stored_with_the_version_and_applied_unless_pinned(
    tiny_kb: KnowledgeBase, settings: Settings, tiny_st: Path
) -> None:
    result = _train(tiny_kb, settings, tiny_st, negatives=["what is the capital of peru", "tell me a joke"])
    stored = json.loads((result.path / "thresholds.json").read_text())
    assert set(stored) == {"relevance_threshold", "faq_threshold", "clarify_margin"}
    calibration = result.report["calibration"]
    assert calibration["calibrated"] and calibration["negatives"] == 2
    assert {"right", "wrong", "handoff"} <= set(calibration["suggested"])
    RetrieverRegistry(settings.data_dir).activate("v1")
    tiny_kb.close()

    kb = open_knowledge_base(settings)  # a restart serves the active version and its thresholds
    try:
        assert kb.retriever_version and kb.retriever_thresholds == stored
        engine = build_engine(settings, kb=kb)
        assert engine.policy.relevance_threshold == stored["relevance_threshold"]
        pinned = settings.replace(policy={"pin_thresholds": True})
        assert build_engine(pinned, kb=kb).policy == pinned.policy
    finally:
        kb.close()


def test_training_resumes_from_its_checkpoint(
    tiny_kb: KnowledgeBase, settings: Settings, tiny_st: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finetune.retriever as recipe

    real = recipe._features
    calls = {"n": 0}

    def interrupt_at_step_four(model, texts, device):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 7:  # two calls per step: the 4th step's anchors
            raise KeyboardInterrupt
        return real(model, texts, device)

    monkeypatch.setattr(recipe, "_features", interrupt_at_step_four)
    with pytest.raises(TrainingInterrupted) as info:
        _train(tiny_kb, settings, tiny_st)
    assert info.value.step == 3 and info.value.checkpoint and info.value.checkpoint.exists()
    monkeypatch.setattr(recipe, "_features", real)
    result = _train(tiny_kb, settings, tiny_st, resume=True)
    assert result.report["training"]["resumed_from"] == 3  # Ctrl-C saved the step it had reached
    assert result.report["training"]["steps"] == result.report["training"]["total_steps"]
    assert not RetrieverRegistry(settings.data_dir).run_dir("v1").exists()


def test_resume_refuses_a_checkpoint_of_other_data(
    tiny_kb: KnowledgeBase, settings: Settings, tiny_st: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finetune.retriever as recipe

    real = recipe._features
    calls = {"n": 0}

    def interrupt(model, texts, device):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(model, texts, device)

    monkeypatch.setattr(recipe, "_features", interrupt)
    with pytest.raises(TrainingInterrupted):
        _train(tiny_kb, settings, tiny_st)
    monkeypatch.setattr(recipe, "_features", real)
    with pytest.raises(SupportBotError, match="other training data"):
        _train(tiny_kb, settings, tiny_st, examples=EXAMPLES[:-2], resume=True)


# -- the background swap -----------------------------------------------------------------------------


class _Tagged(HashingEmbedder):
    """A fake embedder whose vectors say which model made them (first coordinate)."""

    def __init__(self, tag: float, name: str) -> None:
        super().__init__(dim=64)
        self.tag, self.name = tag, name

    def embed_batch(self, texts):  # type: ignore[no-untyped-def]
        vectors = super().embed_batch(texts) * 0.5
        vectors[:, 0] = self.tag
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_background_swap_serves_old_then_new_never_a_mix(settings: Settings) -> None:
    old, new = _Tagged(1.0, "old"), _Tagged(-1.0, "new")
    kb = KnowledgeBase(settings.data_dir / "kb", settings.kb, old, background=False)
    kb.upsert(ENTRIES)

    def dense_tag() -> float:
        # Same model for query and index: the tag coordinates multiply to +1 and the dense score
        # stays high; a mix (old query, new index) would make it -1 and sink every score.
        hit = kb.search("How do I get a refund?", 1, mode="dense")[0]
        return hit.dense

    same_model = dense_tag()
    assert same_model > 0.6
    ready = threading.Event()
    kb.use_retriever(new, version="retriever:new:1", thresholds={"faq_threshold": 0.7}, ready=ready)
    # The new index is built and waits for `ready`: searches meanwhile are served by the old pair.
    for _ in range(5):
        assert kb.embedder is old and abs(dense_tag() - same_model) < 1e-6
    assert kb.swapping and kb.retriever_version is None
    kb.upsert([ENTRIES[0].with_changes(alt_questions=("a refund question added during the swap",))])
    ready.set()
    kb.wait_for_swap()
    assert kb.embedder is new and kb.retriever_version == "retriever:new:1"
    assert kb.retriever_thresholds == {"faq_threshold": 0.7}
    assert abs(dense_tag() - same_model) < 1e-6  # new query vectors against new index vectors
    hit = kb.search("a refund question added during the swap", 1)[0]
    assert hit.entry.id == "refund" and hit.matched == "a refund question added during the swap"
    kb.close()
    _, _, recipe = DenseIndex.load(settings.data_dir / "kb" / KnowledgeBase.DENSE_FILE)
    assert recipe.startswith("new;")  # saved with the new model: a restart serving it opens it as is


def test_a_search_racing_the_swap_embeds_again_with_the_new_model(settings: Settings) -> None:
    old, new = _Tagged(1.0, "old"), _Tagged(-1.0, "new")
    kb = KnowledgeBase(settings.data_dir / "kb", settings.kb, old, background=False)
    kb.upsert(ENTRIES)
    embedded, swapped = threading.Event(), threading.Event()

    class Slow(_Tagged):
        def embed_batch(self, texts):  # type: ignore[no-untyped-def]
            out = super().embed_batch(texts)
            if texts == ["How do I get a refund?"] and not embedded.is_set():
                embedded.set()
                swapped.wait(10)  # the swap lands between embedding and ranking
            return out

    slow = Slow(1.0, "old")
    kb.embedder = slow
    result: list[float] = []
    searcher = threading.Thread(
        target=lambda: result.append(kb.search("How do I get a refund?", 1, mode="dense")[0].dense)
    )
    searcher.start()
    assert embedded.wait(10)
    kb.use_retriever(new, version="v-new", wait=True)
    swapped.set()
    searcher.join(10)
    assert result and result[0] > 0.6  # the old query vector was not ranked against the new index
    kb.close()


def test_engine_follows_activation_without_restart(tiny_kb: KnowledgeBase, settings: Settings, tiny_st: Path) -> None:
    _train(tiny_kb, settings, tiny_st, config=RetrieverTrainConfig(max_steps=1, batch_size=4, reranker="off"))
    engine = build_engine(settings, kb=tiny_kb)
    engine.retrieve("refund")
    assert tiny_kb.retriever_version is None
    RetrieverRegistry(settings.data_dir).activate("v1")
    engine.retrieve("refund")  # notices, starts the background swap, answers with the old version
    tiny_kb.wait_for_swap()
    assert tiny_kb.retriever_version and tiny_kb.retriever_version.startswith("retriever:v1:")
    RetrieverRegistry(settings.data_dir).rollback()
    engine.retrieve("refund")
    tiny_kb.wait_for_swap()
    assert tiny_kb.retriever_version is None


def test_load_version_names_the_embedder_by_version(tiny_kb: KnowledgeBase, settings: Settings, tiny_st: Path) -> None:
    _train(tiny_kb, settings, tiny_st, config=RetrieverTrainConfig(max_steps=1, batch_size=4, reranker="off"))
    version = RetrieverRegistry(settings.data_dir).get("v1")
    embedder, reranker = load_version(version, settings.kb)
    assert embedder.name == f"st:{version.version}" and reranker is None


def test_policy_settings_have_pin_thresholds() -> None:
    assert PolicySettings().pin_thresholds is False


# -- reranking at query time ---------------------------------------------------------------------


class _FakeReranker:
    """Prefers the entry whose id is given, whatever the bi-encoder thought."""

    def __init__(self, favourite: str) -> None:
        self.favourite = favourite

    def score(self, query, texts):  # type: ignore[no-untyped-def]
        return np.asarray([0.9 if t.startswith(_question_of(self.favourite)) else 0.1 for t in texts], np.float32)


def _question_of(entry_id: str) -> str:
    return next(e.question for e in ENTRIES if e.id == entry_id)


def test_an_enabled_reranker_reorders_and_its_score_is_what_thresholds_see(settings: Settings) -> None:
    kb = KnowledgeBase(settings.data_dir / "kb", settings.kb, HashingEmbedder(), background=False)
    kb.upsert(ENTRIES)
    plain = kb.search("How do I get a refund?", 3)
    assert plain[0].entry.id == "refund"
    kb.use_retriever(kb.embedder, reranker=_FakeReranker("hours"), version="v-rr", wait=True)
    hits = kb.search("How do I get a refund?", 3)
    assert hits[0].entry.id == "hours" and len(hits) == 3
    assert hits[0].score == pytest.approx(0.9) and hits[1].score == pytest.approx(0.1)
    assert kb.search("How do I get a refund?", 3, mode="dense")[0].entry.id == "refund"  # raw signals
    kb.close()


def test_reranker_trains_and_the_gate_records_both_figures(
    tiny_kb: KnowledgeBase, settings: Settings, tiny_st: Path
) -> None:
    config = RetrieverTrainConfig(max_steps=2, batch_size=8, max_length=32, reranker="train", reranker_max_anchors=8)
    report = _train(tiny_kb, settings, tiny_st, config=config).report["reranker"]
    assert report["trained"] is True
    assert {"p@1", "bi_encoder_p@1", "latency_p95_ms", "bi_encoder_latency_p95_ms", "reason"} <= set(report)
    expected = reranker_decision(
        report["bi_encoder_p@1"], report["p@1"], report["bi_encoder_latency_p95_ms"], report["latency_p95_ms"]
    )
    assert (report["enabled"], report["reason"]) == expected
    version = RetrieverRegistry(settings.data_dir).get("v1")
    assert version.reranker_enabled is report["enabled"]
    assert (version.path / "reranker").is_dir() is report["enabled"]  # saved only when it is switched on


# -- the CLI and the console job -------------------------------------------------------------------


def test_cli_trains_lists_activates_and_rolls_back(
    settings: Settings, tiny_st: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from chatbot import cli, services

    for name in [n for n in __import__("os").environ if n.startswith("SUPPORTBOT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(services, "make_embedder", lambda s: MeanPoolingEmbedder(tiny_st, model="tiny"))
    data = str(tmp_path / "cli-data")
    faq = tmp_path / "faq.json"
    faq.write_text(json.dumps([{"id": e.id, "question": e.question, "answer": e.answer,
                                "alt_questions": list(e.alt_questions)} for e in ENTRIES]))  # fmt: skip
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"query": q, "faq_id": e}) + "\n" for q, e in EXAMPLES))

    def run(*args: str) -> tuple[int, dict]:
        code = cli.main([*args, "--data-dir", data, "--json"])
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip() else {}

    assert run("kb", "add", str(faq))[0] == 0
    code, out = run("finetune", "--retriever", "--output", "r1", "--base-model", str(tiny_st),
                    "--examples", str(examples), "--max-steps", "2", "--reranker", "off", "--no-progress")  # fmt: skip
    assert code == 0 and out["retriever"] == "r1" and out["report"]["training"]["steps"] == 2
    assert set(out["thresholds"]) == {"relevance_threshold", "faq_threshold", "clarify_margin"}
    assert run("retrievers", "list")[1]["retrievers"][0]["name"] == "r1"
    assert run("retrievers", "activate", "r1")[1]["active"] == "r1"
    assert run("retrievers", "remove", "r1")[0] == 2  # the active one is refused
    assert run("retrievers", "rollback")[1]["active"] is None
    assert run("retrievers", "remove", "r1")[1]["removed"] == "r1"


def test_console_job_uses_the_cli_validation() -> None:
    from ui.jobs import main, retriever_command

    argv = retriever_command("ret-1", epochs=2, reranker="off", activate=True)
    assert argv[1:4] == ["-m", "ui.jobs", "finetune-retriever"]
    assert argv[4:] == ["--output", "ret-1", "--activate", "--epochs", "2", "--reranker", "off"]
    with pytest.raises(ConfigError) as info:
        retriever_command("bad name!", epochs=-1)
    assert "--output" in str(info.value) and "--epochs" in str(info.value)
    assert main(["finetune-retriever", "--output", "x", "--examples", "/no/such/file.jsonl"]) == 2


def test_learned_phrasings_travel_with_the_swap(settings: Settings) -> None:
    old, new = _Tagged(1.0, "old"), _Tagged(-1.0, "new")
    kb = KnowledgeBase(settings.data_dir / "kb", settings.kb, old, background=False)
    kb.upsert(ENTRIES)
    kb.learn("my kettle money please", "refund", source="api")
    ready = threading.Event()
    kb.use_retriever(new, version="v-new", ready=ready)
    kb.learn("need my cash for the kettle", "refund", source="api")  # learned while the new index is built
    ready.set()
    kb.wait_for_swap()
    for query in ("my kettle money please", "need my cash for the kettle"):
        hit = kb.search(query, 1, mode="dense")[0]
        assert hit.entry.id == "refund" and hit.dense > 0.9  # its own vector, embedded by the new model
    kb.close()
