"""Fine-tuning the retriever: the embedder learns this knowledge base's wording, and an optional
cross-encoder reranks the top candidates where it pays.

The recipe (`train_retriever`, behind ``supportbot finetune --retriever``):

1. **Pairs** (`build_pairs`): every alternative phrasing → its entry (main question + answer); every
   labelled customer question (``kb.examples(positive=True)``, or the ``examples`` given) → its entry
   and → its main question; every main question → its answer.
2. **Held-out traffic** (`split_examples`): the labelled examples of a share of entries are held out
   whole (*by entry*: shows whether entries without traffic are forgotten), and a share of the other
   entries' examples (*by example*). Neither is trained on.
3. **Hard negatives** mined from the knowledge base with the retriever in service: for each anchor,
   the best-ranked entries that are not its own.
4. **Contrastive training** of a sentence-transformers model (multiple-negatives ranking loss: the
   other positives of a batch plus the mined negatives; a batch never holds one entry twice, which
   would make a right answer a negative), a plain torch loop (no ``datasets``/``accelerate``
   Trainer: faster on a small CPU), checkpointed every N steps with optimizer, step and RNG state.
5. **Report**: P@1, hit@5, MRR@10 and query latency of the retriever in service (*before*) and the
   fine-tuned one (*after*), on both held-out splits, measured in the same run on the same indexes
   (the training split's labelled questions are phrasings in both, as learned phrasings are).
6. **Reranker** (`reranker_decision`): a ``CrossEncoder`` from the base model's weights with a fresh
   1-logit head, trained on the same pairs and negatives; enabled only if it beats the fine-tuned
   bi-encoder's P@1 with a query p95 within ``max_latency_ratio`` of the bi-encoder's. In ``auto``
   mode its latency is measured first, untrained (the same cost), and training is skipped when that
   alone misses the latency bound.
7. **Thresholds**: `chatbot.answer_eval.calibrate` on the held-out traffic and out-of-scope questions
   (``negatives``, default the generic off-topic questions shipped in ``finetune/off_topic.jsonl``),
   run on exactly the scores the version produces (the reranker's when it is on).

The version is saved under ``<data_dir>/retrievers/NAME/`` (`knowledge_base.retrievers`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import random
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatbot.answer_eval import calibrate, percentile
from chatbot.policy import THRESHOLD_FIELDS
from chatbot.settings import PolicySettings
from finetune.train import TrainingInterrupted
from knowledge_base.atomic import atomic_path, atomic_write_text
from knowledge_base.errors import ConfigError, Problem, SupportBotError
from knowledge_base.retriever import Searcher, SearchHit, rerank_text
from knowledge_base.retrievers import (
    MODEL_DIR,
    RERANKER_DIR,
    CrossEncoderReranker,
    RetrieverError,
    RetrieverRegistry,
    RetrieverVersion,
    validate_retriever_name,
)

if TYPE_CHECKING:
    from knowledge_base.entry import FAQEntry
    from knowledge_base.kb import KnowledgeBase

__all__ = [
    "OFF_TOPIC_FILE",
    "RetrieverRequest",
    "RetrieverTrainConfig",
    "RetrieverTrainResult",
    "TrainingPair",
    "add_retriever_arguments",
    "build_pairs",
    "off_topic_questions",
    "reranker_decision",
    "retrieval_metrics",
    "split_examples",
    "summary_lines",
    "train_retriever",
]

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
OFF_TOPIC_FILE = Path(__file__).with_name("off_topic.jsonl")
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class RetrieverTrainConfig:
    """How `train_retriever` trains (the CLI flags of ``supportbot finetune --retriever``)."""

    epochs: float = 1.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    """Pairs per step; the other pairs of a batch are each anchor's in-batch negatives."""
    hard_negatives: int = 1
    """Mined wrong entries per anchor (0: in-batch negatives only)."""
    max_length: int = 64
    """Tokens per text while training: the whole-entry vectors the index serves are cut at
    ``kb.answer_tokens`` (64) tokens, so longer training text costs time (attention and the
    feed-forward grow with it) for words the served vectors never see."""
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    scale: float = 20.0
    """Cosine similarities are multiplied by this before the softmax (sentence-transformers' default)."""
    seed: int = 13
    checkpoint_every: int = 50
    max_steps: int | None = None
    holdout_fraction: float = 0.2
    """Share of each entry's labelled examples held out (after the held-out entries)."""
    holdout_entries: float = 0.1
    """Share of the entries with labelled examples whose examples are all held out."""
    reranker: str = "auto"
    """"auto": train a cross-encoder unless its latency alone already rules it out; "train": always
    train and measure it; "off": none. It is *enabled* only when `reranker_decision` says so."""
    reranker_negatives: int = 3
    reranker_epochs: float = 1.0
    reranker_max_anchors: int = 2000
    """Anchors the reranker trains on at most (each with its positive and negatives)."""
    rerank_top: int = 10
    max_latency_ratio: float = 1.2
    device: str = "auto"

    def problems(self) -> list[Problem]:
        out = []
        if self.epochs <= 0:
            out.append(Problem("--epochs", "must be positive", "e.g. 1"))
        if not 0 < self.learning_rate < 1:
            out.append(Problem("--lr", f"{self.learning_rate} is not a learning rate", "e.g. 5e-5"))
        if self.batch_size < 2:
            out.append(Problem("--batch-size", "must be at least 2 (in-batch negatives)", "e.g. 32"))
        if self.hard_negatives < 0 or self.reranker_negatives < 1:
            out.append(Problem("--hard-negatives", "must be >= 0 (reranker negatives >= 1)", "e.g. 1"))
        if self.max_length < 16:
            out.append(Problem("--max-length", "must be at least 16 tokens", "e.g. 128"))
        if not 0 <= self.holdout_fraction < 1 or not 0 <= self.holdout_entries < 1:
            out.append(Problem("--holdout", "fractions must be in [0, 1)", "e.g. 0.2 and 0.1"))
        if self.reranker not in ("auto", "train", "off"):
            out.append(Problem("--reranker", f"unknown mode {self.reranker!r}", "use auto, train or off"))
        if self.checkpoint_every < 1:
            out.append(Problem("--checkpoint-every", "must be at least 1", "e.g. 50"))
        if self.max_steps is not None and self.max_steps < 1:
            out.append(Problem("--max-steps", "must be at least 1", "leave it out to train for --epochs"))
        if self.rerank_top < 2 or self.max_latency_ratio < 1:
            out.append(Problem("--rerank-top/--max-latency-ratio", "too small", "e.g. 10 and 1.2"))
        return out


@dataclass(frozen=True)
class TrainingPair:
    anchor: str
    positive: str
    entry_id: str
    kind: str
    """"phrasing" (alt question → entry), "learned" (labelled question → entry), "learned_question"
    (labelled question → main question), "answer" (main question → answer)."""
    target: str = "entry"
    """What ``positive`` is, so that a negative is the same kind of text: "entry", "question", "answer"."""


@dataclass
class RetrieverTrainResult:
    name: str
    path: Path
    report: dict[str, Any]
    activated: bool = False
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "retriever": self.name,
            "path": str(self.path),
            "activated": self.activated,
            "thresholds": self.thresholds,
            "report": self.report,
        }


# -- data ------------------------------------------------------------------------------------------


def entry_text(entry: FAQEntry) -> str:
    return f"{entry.question}\n{entry.answer}"


def _text_of(entry: FAQEntry, target: str) -> str:
    return {"entry": entry_text(entry), "question": entry.question, "answer": entry.answer}[target]


def build_pairs(entries: Sequence[FAQEntry], examples: Sequence[tuple[str, str]] = ()) -> list[TrainingPair]:
    """The training pairs of `train_retriever` (see the module docstring); ``examples``: (query,
    entry id) of labelled traffic; examples of unknown or disabled entries are ignored."""
    live = {e.id: e for e in entries if e.enabled}
    pairs: list[TrainingPair] = []
    seen: set[tuple[str, str, str]] = set()

    def add(anchor: str, entry: FAQEntry, kind: str, target: str) -> None:
        key = (anchor.casefold(), entry.id, target)
        if anchor.strip() and key not in seen:
            seen.add(key)
            pairs.append(TrainingPair(anchor, _text_of(entry, target), entry.id, kind, target))

    for entry in live.values():
        add(entry.question, entry, "answer", "answer")
        for alt in entry.alt_questions:
            add(alt, entry, "phrasing", "entry")
    for query, entry_id in examples:
        found = live.get(entry_id)
        if found is not None:
            add(query, found, "learned", "entry")
            if query.casefold() != found.question.casefold():
                add(query, found, "learned_question", "question")
    return pairs


def split_examples(
    examples: Sequence[tuple[str, str]], *, holdout_fraction: float, holdout_entries: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held out by example, held out by entry) of (query, entry id) examples.

    A share ``holdout_entries`` of the entries with examples lose all of theirs to the *by entry*
    split (at least one entry once there are five); of every other entry with two or more examples
    a share ``holdout_fraction`` goes to the *by example* split (at least one per entry at 0.1
    and up, never the last one: the entry keeps training traffic)."""
    rng = random.Random(seed)
    by_entry: dict[str, list[tuple[str, str]]] = {}
    for query, entry_id in examples:
        by_entry.setdefault(entry_id, []).append((query, entry_id))
    ids = sorted(by_entry)
    rng.shuffle(ids)
    n_out = int(len(ids) * holdout_entries) if holdout_entries > 0 else 0
    if holdout_entries > 0 and n_out == 0 and len(ids) >= 5:
        n_out = 1
    out_entries = set(ids[:n_out])
    train, held_example, held_entry = [], [], []
    for entry_id in sorted(by_entry):
        rows = by_entry[entry_id]
        if entry_id in out_entries:
            held_entry += rows
            continue
        rows = rows[:]
        rng.shuffle(rows)
        k = min(len(rows) - 1, max(1 if holdout_fraction >= 0.1 else 0, round(len(rows) * holdout_fraction)))
        held_example += rows[:k]
        train += rows[k:]
    return train, held_example, held_entry


def off_topic_questions(path: Path = OFF_TOPIC_FILE) -> list[str]:
    """Generic questions no customer-service FAQ answers (weather, recipes, trivia...): the
    out-of-scope side of threshold calibration when a team has none of its own."""
    return [str(json.loads(line)["query"]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _kb_examples(kb: KnowledgeBase) -> list[tuple[str, str]]:
    """The knowledge base's positive labelled traffic (none where that table does not exist yet)."""
    examples = getattr(kb, "examples", None)
    if examples is None:
        return []
    return [(e.query, e.entry_id) for e in examples(positive=True)]


# -- evaluation ------------------------------------------------------------------------------------


def retrieval_metrics(
    searcher: Searcher, queries: Sequence[tuple[str, str]], *, k: int = 10
) -> tuple[dict[str, float], list[list[SearchHit]]]:
    """P@1, hit@5, MRR@10 of ``searcher`` on (query, entry id) pairs, and its hits per query."""
    if not queries:
        return {"queries": 0}, []
    results = searcher.search_many([q for q, _ in queries], k)
    ranks: list[int | None] = []
    for (_, gold), hits in zip(queries, results, strict=True):
        ids = [h.entry.id for h in hits]
        ranks.append(ids.index(gold) + 1 if gold in ids else None)
    n = len(ranks)
    return {
        "queries": n,
        "p@1": sum(r == 1 for r in ranks) / n,
        "hit@5": sum(r is not None and r <= 5 for r in ranks) / n,
        "mrr@10": sum(1.0 / r for r in ranks if r is not None and r <= 10) / n,
    }, results


def _latency(searcher: Searcher, queries: Sequence[str], k: int) -> dict[str, float]:
    """Per-query search time (embedding one query, ranking, reranking) in ms, after a warm-up."""
    if not queries:
        return {}
    searcher.search(queries[0], k)
    times = []
    for query in queries:
        start = time.perf_counter()
        searcher.search(query, k)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50": round(percentile(times, 50), 2), "p95": round(percentile(times, 95), 2), "queries": len(times)}


def reranker_decision(
    bi_encoder_p1: float,
    reranker_p1: float | None,
    bi_encoder_p95_ms: float,
    reranker_p95_ms: float,
    *,
    max_latency_ratio: float = 1.2,
) -> tuple[bool, str]:
    """Whether the reranker is switched on, and why: only when it beats the fine-tuned bi-encoder's
    P@1 on held-out traffic *and* its query p95 (bi-encoder + reranking) stays within
    ``max_latency_ratio`` of the bi-encoder's alone. ``reranker_p1`` None: not trained."""
    bound = bi_encoder_p95_ms * max_latency_ratio
    slow = reranker_p95_ms > bound
    latency = f"p95 {reranker_p95_ms:.1f} ms vs bound {bound:.1f} ms ({max_latency_ratio}x {bi_encoder_p95_ms:.1f} ms)"
    if reranker_p1 is None:
        return False, f"not trained: {latency}" if slow else "not trained"
    if reranker_p1 <= bi_encoder_p1:
        return False, f"P@1 {reranker_p1:.3f} does not beat the bi-encoder's {bi_encoder_p1:.3f}"
    if slow:
        return False, f"P@1 {reranker_p1:.3f} beats {bi_encoder_p1:.3f} but is too slow: {latency}"
    return True, f"P@1 {reranker_p1:.3f} beats {bi_encoder_p1:.3f}; {latency}"


# -- training --------------------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _batches(pairs: Sequence[TrainingPair], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches in which no entry appears twice (its second pair waits for a later batch):
    a right answer must never be an anchor's in-batch negative."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    pending = order
    while pending:
        current: list[int] = []
        used: set[str] = set()
        later: list[int] = []
        for i in pending:
            if len(current) < batch_size and pairs[i].entry_id not in used:
                current.append(i)
                used.add(pairs[i].entry_id)
            else:
                later.append(i)
        if len(current) < 2 and batches:  # a leftover of one entry: in-batch negatives need two
            batches[-1].extend(current)
        else:
            batches.append(current)
        pending = later
    return batches


def mine_hard_negatives(
    searcher: Searcher, pairs: Sequence[TrainingPair], entries: dict[str, FAQEntry], n: int
) -> list[list[str]]:
    """For each pair, the texts (of the pair's target kind) of the ``n`` best-ranked entries that
    are not its own, as the retriever in ``searcher`` ranks them for the anchor."""
    if n <= 0:
        return [[] for _ in pairs]
    results = searcher.search_many([p.anchor for p in pairs], n + 3)
    out = []
    for pair, hits in zip(pairs, results, strict=True):
        wrong = [
            h.entry for h in hits if h.entry.id != pair.entry_id and h.entry.answer != entries[pair.entry_id].answer
        ]
        out.append([_text_of(e, pair.target) for e in wrong[:n]])
    return out


def _data_hash(pairs: Sequence[TrainingPair], negatives: Sequence[Sequence[str]], config: RetrieverTrainConfig) -> str:
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for pair, neg in zip(pairs, negatives, strict=True):
        digest.update(f"{pair.anchor}\0{pair.positive}\0{chr(1).join(neg)}\0".encode())
    return digest.hexdigest()[:16]


def _features(model: Any, texts: Sequence[str], device: str) -> dict[str, Any]:
    features = model.preprocess(list(texts))
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}


def _train_bi_encoder(
    model: Any,
    pairs: Sequence[TrainingPair],
    negatives: Sequence[Sequence[str]],
    config: RetrieverTrainConfig,
    *,
    device: str,
    run_dir: Path,
    resume: bool,
    data_hash: str,
    emit: Progress,
    bar: Any,
) -> dict[str, Any]:
    """The contrastive loop; returns the training figures. Checkpoints in ``run_dir``."""
    import torch

    rng = random.Random(config.seed)
    epoch_batches = _batches(pairs, config.batch_size, random.Random(config.seed))
    steps_per_epoch = len(epoch_batches)
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, int(total * config.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    step, losses = 0, []
    checkpoint = run_dir / CHECKPOINT_FILE
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("data_hash") != data_hash:
            raise SupportBotError(
                f"the checkpoint in {run_dir} was made from other training data or settings",
                fix="run without --resume (or with --restart) to start over",
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses = int(state["step"]), list(state["losses"])
        torch.set_rng_state(state["torch_rng"])
        rng.setstate(state["py_rng"])
        emit({"event": "phase", "phase": f"resumed at step {step}/{total}"})
    else:
        torch.manual_seed(config.seed)

    def save_checkpoint() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "losses": losses,
            "torch_rng": torch.get_rng_state(),
            "py_rng": rng.getstate(),
            "data_hash": data_hash,
        }
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    def batches_from(start: int) -> list[list[int]]:
        # Epoch e's order comes from seed + e alone, so a resumed run sees the same batches.
        epoch = start // steps_per_epoch
        order = _batches(pairs, config.batch_size, random.Random(config.seed + epoch)) if epoch else epoch_batches
        return order[start % steps_per_epoch :]

    started, first_step = time.perf_counter(), step
    if bar is not None:
        bar.reset(total=total)
        bar.update(step)
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    try:
        while step < total:
            for batch in batches_from(step):
                if step >= total:
                    break
                anchors = [pairs[i].anchor for i in batch]
                candidates = [pairs[i].positive for i in batch] + [t for i in batch for t in negatives[i]]
                a = model(_features(model, anchors, device))["sentence_embedding"]
                c = model(_features(model, candidates, device))["sentence_embedding"]
                a = torch.nn.functional.normalize(a, dim=-1)
                c = torch.nn.functional.normalize(c, dim=-1)
                scores = a @ c.T * config.scale
                loss = loss_fn(scores, torch.arange(len(batch), device=scores.device))
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                value = loss.detach().item()
                losses.append(round(value, 4))
                elapsed = time.perf_counter() - started
                eta = elapsed / (step - first_step) * (total - step)
                emit(
                    {
                        "event": "step",
                        "step": step,
                        "total_steps": total,
                        "epoch": round(step / steps_per_epoch, 3),
                        "loss": value,
                        "eta_s": round(eta, 1),
                    }
                )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}")
                if step % config.checkpoint_every == 0 and step < total:
                    save_checkpoint()
    except KeyboardInterrupt:
        if step > first_step or checkpoint.exists():
            save_checkpoint()
            raise TrainingInterrupted(step, total, checkpoint) from None
        raise TrainingInterrupted(step, total, None) from None
    model.eval()
    seconds = time.perf_counter() - started
    return {
        "steps": step,
        "total_steps": total,
        "steps_this_run": step - first_step,
        "seconds": round(seconds, 1),
        "pairs_per_s": round((step - first_step) * config.batch_size / max(seconds, 1e-9), 1),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "resumed_from": first_step or None,
    }


def _train_reranker(
    base: Path,
    pairs: Sequence[TrainingPair],
    negatives: Sequence[Sequence[str]],
    entries: dict[str, FAQEntry],
    config: RetrieverTrainConfig,
    *,
    device: str,
    emit: Progress,
) -> Any:
    """A ``CrossEncoder`` (base weights, fresh 1-logit head) trained with binary cross-entropy on
    (anchor, entry) = 1 and (anchor, mined wrong entry) = 0."""
    import torch
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(base), num_labels=1, device=device, max_length=config.max_length)
    model = ce.model
    tokenizer = ce.tokenizer
    rng = random.Random(config.seed + 1)
    anchors = [i for i, p in enumerate(pairs) if p.target == "entry" and negatives[i]]
    rng.shuffle(anchors)
    anchors = anchors[: config.reranker_max_anchors]
    rows: list[tuple[str, str, float]] = []
    for i in anchors:
        pair = pairs[i]
        rows.append((pair.anchor, rerank_text(entries[pair.entry_id]), 1.0))
        rows += [(pair.anchor, text, 0.0) for text in negatives[i][: config.reranker_negatives]]
    rng.shuffle(rows)
    batch_size = config.batch_size
    total = max(1, math.ceil(config.reranker_epochs * len(rows) / batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    started = time.perf_counter()
    for step in range(total):
        start = (step * batch_size) % max(len(rows), 1)
        batch = rows[start : start + batch_size] or rows[:batch_size]
        enc = tokenizer(
            [r[0] for r in batch],
            [r[1] for r in batch],
            padding=True,
            truncation=True,
            max_length=config.max_length,
            return_tensors="pt",
        ).to(device)
        logits = model(**enc).logits.view(-1)
        loss = loss_fn(logits, torch.tensor([r[2] for r in batch], device=logits.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - started
        emit(
            {
                "event": "step",
                "phase": "reranker",
                "step": step + 1,
                "total_steps": total,
                "loss": loss.detach().item(),
                "eta_s": round(elapsed / (step + 1) * (total - step - 1), 1),
            }
        )
    model.eval()
    return ce


class _LoadedReranker(CrossEncoderReranker):
    """A `CrossEncoderReranker` around a model already in memory (the one just trained, or the
    untrained one whose latency is measured)."""

    def __init__(self, model: Any) -> None:
        super().__init__(Path("."))
        self._model = model


# -- the whole run -----------------------------------------------------------------------------------


def train_retriever(
    kb: KnowledgeBase,
    output: str,
    *,
    data_dir: Path | str,
    base_model: Path | str | None = None,
    examples: Sequence[tuple[str, str]] | None = None,
    heldout: Sequence[tuple[str, str]] | None = None,
    negatives: Sequence[str] | None = None,
    config: RetrieverTrainConfig | None = None,
    policy: PolicySettings | None = None,
    resume: bool = False,
    overwrite: bool = False,
    activate: bool = False,
    on_progress: Progress | None = None,
    progress_bar: bool = False,
) -> RetrieverTrainResult:
    """Fine-tune the embedder of ``kb`` (and maybe a reranker); save version ``output`` under
    ``<data_dir>/retrievers/`` with its report and thresholds.

    ``base_model``: the sentence-transformers folder training starts from (default: the configured
    embedding model, or the bundled MiniLM). ``examples``: (query, entry id) labelled traffic
    (default: ``kb.examples(positive=True)``), split into training and held-out traffic
    (`split_examples`) unless ``heldout`` gives the held-out queries, then all of ``examples`` train
    and ``heldout`` is reported as the by-example split. ``negatives``: out-of-scope questions for
    the threshold calibration (default: `off_topic_questions`). ``policy``: the configured
    thresholds (the calibration's starting point and the fallback). ``activate``: make it the
    active version (a running server swaps to it). ``on_progress`` receives the JSON events the
    console job prints (phase, step); ``progress_bar`` draws tqdm bars on stderr.
    """
    config = config or RetrieverTrainConfig()
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    policy = policy or PolicySettings()
    registry = RetrieverRegistry(data_dir)
    name = validate_retriever_name(output)
    target = registry.path(name)
    if target.exists() and not overwrite and not resume:
        raise RetrieverError(f"a retriever named {name!r} exists", fix="choose another --output, or --overwrite")
    if target.exists() and registry.exists(name) and registry.get(name).active:
        raise RetrieverError(
            f"retriever {name!r} is active: it cannot be replaced while it serves",
            fix="train under another --output name, or roll back first",
        )
    emit_to = on_progress or (lambda _event: None)

    def emit(event: dict[str, Any]) -> None:
        emit_to(event)

    def phase(text: str) -> None:
        emit({"event": "phase", "phase": text})

    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="step", desc="retriever", dynamic_ncols=True)

    try:
        return _run(
            kb,
            name,
            registry,
            target,
            base_model=base_model,
            examples=examples,
            heldout=heldout,
            negatives=negatives,
            config=config,
            policy=policy,
            resume=resume,
            activate=activate,
            emit=emit,
            phase=phase,
            bar=bar,
        )
    finally:
        if bar is not None:
            bar.close()


def _base_model_path(kb: KnowledgeBase, base_model: Path | str | None) -> Path:
    from knowledge_base.embeddings import default_embedding_path
    from knowledge_base.settings import DEFAULT_EMBEDDING_MODEL

    if base_model is not None:
        path = Path(base_model)
    elif kb.settings.embedding_model == DEFAULT_EMBEDDING_MODEL:
        path = default_embedding_path()
    else:
        path = Path(kb.settings.embedding_model)
    if not (path / "modules.json").is_file():
        raise SupportBotError(
            f"{path} is not a local sentence-transformers folder (no modules.json)",
            fix="pass --base-model DIR, or set kb.embedding_model to such a folder",
        )
    return path


def _run(
    kb: KnowledgeBase,
    name: str,
    registry: RetrieverRegistry,
    target: Path,
    *,
    base_model: Path | str | None,
    examples: Sequence[tuple[str, str]] | None,
    heldout: Sequence[tuple[str, str]] | None,
    negatives: Sequence[str] | None,
    config: RetrieverTrainConfig,
    policy: PolicySettings,
    resume: bool,
    activate: bool,
    emit: Progress,
    phase: Callable[[str], None],
    bar: Any,
) -> RetrieverTrainResult:
    import transformers
    from sentence_transformers import SentenceTransformer

    from knowledge_base.embeddings import MeanPoolingEmbedder

    transformers.utils.logging.disable_progress_bar()
    base = _base_model_path(kb, base_model)
    device = _resolve_device(config.device)
    entries = {e.id: e for e in kb.entries(enabled_only=True)}
    if not entries:
        raise SupportBotError("the knowledge base has no enabled entries", fix="add FAQ entries first")

    # 1-2. Labelled traffic and its held-out splits; the training pairs.
    phase("preparing pairs")
    labelled = [(q, e) for q, e in (examples if examples is not None else _kb_examples(kb)) if e in entries]
    if heldout is not None:
        train_examples, held_example, held_entry = list(labelled), [(q, e) for q, e in heldout if e in entries], []
    else:
        train_examples, held_example, held_entry = split_examples(
            labelled,
            holdout_fraction=config.holdout_fraction,
            holdout_entries=config.holdout_entries,
            seed=config.seed,
        )
    pairs = build_pairs(list(entries.values()), train_examples)
    if len(pairs) < 2:
        raise SupportBotError(
            f"only {len(pairs)} training pair(s): too little to train on",
            fix="add alternative phrasings to entries, or label customer questions (kb learn)",
        )
    # The indexes every ranking of this run uses: the entries' own phrasings plus the training
    # split's labelled questions (learned phrasings), never the held-out ones.
    extra = [(e, q) for q, e in train_examples]

    # 3. The retriever in service: the "before" figures and the hard negatives.
    phase("embedding the knowledge base with the retriever in service")
    before = kb.searcher(extra_phrasings=extra, exclude_kinds=("l",))
    phase("mining hard negatives")
    hard = mine_hard_negatives(before, pairs, entries, max(config.hard_negatives, config.reranker_negatives))
    bi_negatives = [n[: config.hard_negatives] for n in hard]
    k = 10
    report: dict[str, Any] = {
        "name": name,
        "base_model": str(base),
        "before_model": kb.embedder.name,
        "device": device,
        "config": dataclasses.asdict(config),
        "data": {
            "entries": len(entries),
            "pairs": len(pairs),
            "pairs_by_kind": {kind: sum(p.kind == kind for p in pairs) for kind in sorted({p.kind for p in pairs})},
            "labelled_examples": len(labelled),
            "train_examples": len(train_examples),
            "heldout_by_example": len(held_example),
            "heldout_by_entry": len(held_entry),
        },
    }
    phase("measuring the retriever in service on held-out traffic")
    report["before"] = _measure(before, held_example, held_entry, k)

    # 4. Training, resumable.
    run_dir = registry.run_dir(name)
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    phase("loading the base model")
    model = SentenceTransformer(str(base), device=device, local_files_only=True)
    serving_length = model.max_seq_length
    model.max_seq_length = min(config.max_length, serving_length or config.max_length)
    phase("training")
    report["training"] = _train_bi_encoder(
        model,
        pairs,
        bi_negatives,
        config,
        device=device,
        run_dir=run_dir,
        resume=resume,
        data_hash=_data_hash(pairs, bi_negatives, config),
        emit=emit,
        bar=bar,
    )

    # The version folder is staged next to its final place, then renamed: never half-written.
    version_id = uuid.uuid4().hex[:12]
    staging = registry.root / f".staging-{name}-{version_id}"
    staging.mkdir(parents=True)
    try:
        model.max_seq_length = serving_length  # queries and entries are embedded as the base model did
        model.save(str(staging / MODEL_DIR))
        del model
        meta = {
            "version_id": version_id,
            "base_model": str(base),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(staging / "retriever.json", json.dumps(meta, indent=2) + "\n")
        version_name = f"retriever:{name}:{version_id}"
        tuned = MeanPoolingEmbedder(staging / MODEL_DIR, model=version_name, device=kb.settings.embedding_device)

        # 5. The fine-tuned bi-encoder on the same held-out traffic and indexes.
        phase("measuring the fine-tuned retriever on held-out traffic")
        after = kb.searcher(tuned, extra_phrasings=extra, exclude_kinds=("l",))
        report["after"] = _measure(after, held_example, held_entry, k)
        held_all = held_example + held_entry
        latency_queries = [q for q, _ in held_all][:200] or [p.anchor for p in pairs][:50]
        bi_latency = _latency(after, latency_queries, k)
        report["after"]["latency_ms"] = bi_latency

        # 6. The reranker, where it pays.
        final = after
        report["reranker"] = _reranker_step(
            base, pairs, hard, entries, config, device, after, held_example, held_entry, bi_latency,
            latency_queries, k, staging, emit, phase,
        )  # fmt: skip
        if report["reranker"]["enabled"]:
            final = after.with_reranker(CrossEncoderReranker(staging / RERANKER_DIR, device=device))

        # 7. Thresholds for the scores this version produces.
        phase("calibrating the thresholds")
        thresholds, calibration = _calibrate(final, held_all, negatives, policy, k)
        report["calibration"] = calibration
        report["thresholds"] = thresholds
        atomic_write_text(staging / "thresholds.json", json.dumps(thresholds, indent=2) + "\n")
        atomic_write_text(staging / "report.json", json.dumps(report, indent=2, default=str) + "\n")
        if target.exists():
            trash = registry.root / f".removing-{name}-{version_id}"
            target.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    activated = False
    if activate:
        registry.activate(name)
        activated = True
    phase("done")
    return RetrieverTrainResult(name, target, report, activated, thresholds)


def _measure(
    searcher: Searcher, held_example: Sequence[tuple[str, str]], held_entry: Sequence[tuple[str, str]], k: int
) -> dict[str, Any]:
    by_example, _ = retrieval_metrics(searcher, held_example, k=k)
    by_entry, _ = retrieval_metrics(searcher, held_entry, k=k)
    out: dict[str, Any] = {"by_example": by_example, "by_entry": by_entry}
    if held_example or held_entry:
        out["latency_ms"] = _latency(searcher, [q for q, _ in [*held_example, *held_entry]][:200], k)
    return out


def _reranker_step(
    base: Path,
    pairs: Sequence[TrainingPair],
    hard: Sequence[Sequence[str]],
    entries: dict[str, FAQEntry],
    config: RetrieverTrainConfig,
    device: str,
    after: Searcher,
    held_example: Sequence[tuple[str, str]],
    held_entry: Sequence[tuple[str, str]],
    bi_latency: dict[str, float],
    latency_queries: Sequence[str],
    k: int,
    staging: Path,
    emit: Progress,
    phase: Callable[[str], None],
) -> dict[str, Any]:
    """Train (or skip) the cross-encoder and decide whether it is switched on."""
    bi_p1 = _p1(after, held_example, held_entry, k) or 0.0
    out: dict[str, Any] = {
        "mode": config.reranker,
        "trained": False,
        "enabled": False,
        "bi_encoder_p@1": bi_p1,
        "bi_encoder_latency_p95_ms": bi_latency.get("p95"),
        "max_latency_ratio": config.max_latency_ratio,
    }
    if config.reranker == "off":
        out["reason"] = "off (--reranker off)"
        return out
    if not (held_example or held_entry):
        out["reason"] = "no held-out labelled traffic to show that it pays"
        return out
    from sentence_transformers import CrossEncoder

    if config.reranker == "auto":
        # An untrained cross-encoder costs what a trained one does: measure before spending the training.
        phase("measuring the reranker's latency")
        probe = CrossEncoder(str(base), num_labels=1, device=device, max_length=config.max_length)
        latency = _latency(after.with_reranker(_LoadedReranker(probe)), latency_queries, k)
        del probe
        out["latency_p95_ms"] = latency["p95"]
        if latency["p95"] > bi_latency["p95"] * config.max_latency_ratio:
            out["enabled"], out["reason"] = reranker_decision(
                bi_p1, None, bi_latency["p95"], latency["p95"], max_latency_ratio=config.max_latency_ratio
            )
            return out
    phase("training the reranker")
    ce = _train_reranker(base, pairs, hard, entries, config, device=device, emit=emit)
    reranked = after.with_reranker(_LoadedReranker(ce))
    phase("measuring the reranker on held-out traffic")
    measured = _measure(reranked, held_example, held_entry, k)
    latency = _latency(reranked, latency_queries, k)
    rr_p1 = _p1(reranked, held_example, held_entry, k)
    out.update(
        trained=True,
        **{"p@1": rr_p1, "latency_p95_ms": latency["p95"], "by_example": measured["by_example"]},
        by_entry=measured["by_entry"],
    )
    out["enabled"], out["reason"] = reranker_decision(
        bi_p1, rr_p1, bi_latency["p95"], latency["p95"], max_latency_ratio=config.max_latency_ratio
    )
    if out["enabled"]:
        ce.save(str(staging / RERANKER_DIR))
    return out


def _p1(
    searcher: Searcher, held_example: Sequence[tuple[str, str]], held_entry: Sequence[tuple[str, str]], k: int
) -> float | None:
    queries = [*held_example, *held_entry]
    if not queries:
        return None
    return float(retrieval_metrics(searcher, queries, k=k)[0]["p@1"])


def _calibrate(
    searcher: Searcher,
    held: Sequence[tuple[str, str]],
    negatives: Sequence[str] | None,
    policy: PolicySettings,
    k: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """(thresholds for the version, the calibration report): `calibrate` on held-out traffic and
    out-of-scope questions; the configured thresholds when there is no held-out traffic."""
    configured = {name: float(getattr(policy, name)) for name in THRESHOLD_FIELDS}
    if not held:
        return configured, {"calibrated": False, "reason": "no held-out labelled traffic: configured thresholds kept"}
    source = "given" if negatives is not None else str(OFF_TOPIC_FILE.name)
    negative_queries = list(negatives) if negatives is not None else off_topic_questions()
    depth = max(k, policy.max_clarify_options)
    positives = [
        ({"query": q, "faq_id": e}, hits)
        for (q, e), hits in zip(held, searcher.search_many([q for q, _ in held], depth), strict=True)
    ]
    negative_hits = searcher.search_many(negative_queries, depth) if negative_queries else []
    result = calibrate(policy, positives, negative_hits)
    suggested = result.get("suggested") or {}
    thresholds = {name: float(suggested.get(name, configured[name])) for name in THRESHOLD_FIELDS}
    result.update(calibrated=True, negatives=len(negative_queries), negatives_source=source, positives=len(held))
    return thresholds, result


def version_summary(version: RetrieverVersion) -> dict[str, Any]:
    """The figures the CLI and the console show for a version."""
    report = version.report
    return {
        "name": version.name,
        "before": report.get("before", {}),
        "after": report.get("after", {}),
        "reranker": report.get("reranker", {}),
        "thresholds": version.thresholds,
        "calibration": {
            key: report.get("calibration", {}).get(key) for key in ("current", "suggested", "meets_goals", "reason")
        },
    }


# -- the request: one builder and one validation for the CLI and the console job ----------------------


def add_retriever_arguments(parser: Any) -> None:
    """The flags only a retriever fine-tune has (``supportbot finetune --retriever`` and the
    console's job process add them with this, so both parse alike)."""
    parser.add_argument("--base-model", type=Path, metavar="DIR", help="sentence-transformers folder to start from")
    parser.add_argument("--batch-size", type=int, help="pairs per step (in-batch negatives)")
    parser.add_argument("--hard-negatives", type=int, help="mined wrong entries per anchor")
    parser.add_argument("--reranker", choices=["auto", "train", "off"], help="cross-encoder: auto (default)")
    parser.add_argument("--examples", type=Path, metavar="FILE", help='labelled traffic {"query","faq_id"} JSONL')
    parser.add_argument("--heldout", type=Path, metavar="FILE", help="held-out queries (default: a split)")
    parser.add_argument("--negatives", type=Path, metavar="FILE", help="out-of-scope queries for calibration")
    parser.add_argument("--device", help="auto (default), cpu or cuda")


@dataclass(frozen=True)
class RetrieverRequest:
    """A validated ``finetune --retriever`` request (built by `from_args` for the CLI and the console)."""

    output: str
    config: RetrieverTrainConfig
    base_model: Path | None = None
    examples: Path | None = None
    heldout: Path | None = None
    negatives: Path | None = None
    resume: bool = False
    overwrite: bool = False
    activate: bool = False

    @classmethod
    def from_args(cls, args: Any) -> RetrieverRequest:
        """From parsed flags; raises `ConfigError` with every problem at once (bad name, bad
        numbers, missing files)."""
        fields = {
            "epochs": "epochs",
            "lr": "learning_rate",
            "batch_size": "batch_size",
            "hard_negatives": "hard_negatives",
            "max_length": "max_length",
            "seed": "seed",
            "checkpoint_every": "checkpoint_every",
            "max_steps": "max_steps",
            "reranker": "reranker",
            "device": "device",
        }
        changes = {f: getattr(args, a) for a, f in fields.items() if getattr(args, a, None) is not None}
        config = dataclasses.replace(RetrieverTrainConfig(), **changes)
        problems = list(config.problems())
        try:
            validate_retriever_name(getattr(args, "output", "") or "")
        except RetrieverError as exc:
            problems.append(Problem("--output", exc.message, exc.fix or ""))
        files = {flag: getattr(args, flag, None) for flag in ("examples", "heldout", "negatives")}
        for flag, path in files.items():
            if path is not None and not Path(path).is_file():
                problems.append(Problem(f"--{flag}", f"{path} does not exist", "give a JSONL file"))
        base = getattr(args, "base_model", None)
        if base is not None and not (Path(base) / "modules.json").is_file():
            problems.append(Problem("--base-model", f"{base} is not a sentence-transformers folder", "no modules.json"))
        if getattr(args, "resume", False) and getattr(args, "restart", False):
            problems.append(Problem("--resume/--restart", "both given", "choose one"))
        if problems:
            raise ConfigError(problems)
        return cls(
            output=args.output,
            config=config,
            base_model=Path(base) if base is not None else None,
            resume=bool(getattr(args, "resume", False)),
            overwrite=bool(getattr(args, "overwrite", False)),
            activate=bool(getattr(args, "activate", False)),
            **{k: Path(v) if v is not None else None for k, v in files.items()},
        )

    def run(
        self, settings: Any, *, on_progress: Progress | None = None, progress_bar: bool = False
    ) -> RetrieverTrainResult:
        """Open the knowledge base of ``settings`` and train (`train_retriever`)."""
        from chatbot.services import open_knowledge_base
        from knowledge_base.evaluate import read_jsonl

        def pairs(path: Path | None) -> list[tuple[str, str]] | None:
            if path is None:
                return None
            return [(str(r["query"]), str(r["faq_id"])) for r in read_jsonl(path, require=["query", "faq_id"])]

        negatives = [str(r["query"]) for r in read_jsonl(self.negatives, require=["query"])] if self.negatives else None
        kb = open_knowledge_base(settings)
        try:
            return train_retriever(
                kb,
                self.output,
                data_dir=settings.data_dir,
                base_model=self.base_model,
                examples=pairs(self.examples),
                heldout=pairs(self.heldout),
                negatives=negatives,
                config=self.config,
                policy=settings.policy,
                resume=self.resume,
                overwrite=self.overwrite,
                activate=self.activate,
                on_progress=on_progress,
                progress_bar=progress_bar,
            )
        finally:
            kb.close()


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as the CLI prints it: held-out figures before/after, the reranker decision, the
    thresholds and their trade-off."""

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) else "-"

    lines = []
    data = report.get("data", {})
    training = report.get("training", {})
    lines.append(
        f"pairs: {data.get('pairs')} ({', '.join(f'{k} {v}' for k, v in data.get('pairs_by_kind', {}).items())}); "
        f"held out: {data.get('heldout_by_example')} by example, {data.get('heldout_by_entry')} by entry"
    )
    lines.append(
        f"training: {training.get('steps')} steps in {training.get('seconds')} s on {report.get('device')}, "
        f"loss {fmt(training.get('first_loss'))} -> {fmt(training.get('final_loss'))}"
    )
    before, after = report.get("before", {}), report.get("after", {})
    lines.append(f"{'held-out':<22}{'before':>8}{'after':>8}")
    for split in ("by_example", "by_entry"):
        b, a = before.get(split, {}), after.get(split, {})
        if not a.get("queries"):
            continue
        for metric in ("p@1", "hit@5", "mrr@10"):
            lines.append(f"{split + ' ' + metric:<22}{fmt(b.get(metric)):>8}{fmt(a.get(metric)):>8}")
    lb, la = before.get("latency_ms", {}).get("p95"), after.get("latency_ms", {}).get("p95")
    if la is not None:
        lines.append(f"{'query p95 (ms)':<22}{fmt(lb):>8}{fmt(la):>8}")
    rr = report.get("reranker", {})
    state = "ON" if rr.get("enabled") else "off"
    lines.append(
        f"reranker {state}: {rr.get('reason', '')} (P@1 bi-encoder {fmt(rr.get('bi_encoder_p@1'))}, "
        f"reranker {fmt(rr.get('p@1'))}; p95 {fmt(rr.get('bi_encoder_latency_p95_ms'))} / "
        f"{fmt(rr.get('latency_p95_ms'))} ms)"
    )
    thresholds = report.get("thresholds", {})
    cal = report.get("calibration", {})
    lines.append("thresholds: " + ", ".join(f"{k} {v:.2f}" for k, v in thresholds.items()))
    suggested = cal.get("suggested")
    if suggested:
        lines.append(
            f"  on held-out traffic: right {suggested['right']:.3f}, wrong {suggested['wrong']:.3f}, "
            f"clarify {suggested['clarify']:.3f}, handed off {suggested['handoff']:.3f}; "
            f"out-of-scope handed off {suggested['negatives_handed_off']:.3f} "
            f"({cal.get('negatives')} {cal.get('negatives_source')} questions)"
            + ("" if cal.get("meets_goals") else "  [goals not met: the least wrong setting]")
        )
    elif cal.get("reason"):
        lines.append(f"  {cal['reason']}")
    return lines
