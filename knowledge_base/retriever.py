"""Ranking FAQ entries for a customer's question, and what the score means.

Each entry is scored on two signals, both in [0, 1]:

* **dense** — cosine similarity between the query's embedding and the entry's closest question
  phrasing (every phrasing has its own vector; learned phrasings, from resolved customer questions,
  count alike: see `knowledge_base.examples`), averaged with weight ``kb.answer_weight`` with the
  cosine to a vector of the whole entry (main question + answer, its first ``kb.answer_tokens``
  tokens): ``(q + w * qa) / (1 + w)``.
  The whole-entry vector catches questions worded like the answer rather than like the question.
  Negative cosines count as 0. An entry whose whole-entry vector is still being embedded (the
  background fill after a large upload) is scored by its phrasings alone, ``q``, until it has one.
* **lexical** — BM25 over the entry's phrasings and answer, divided by the best score that query
  could reach (see `LexicalIndex.scores`), so it too lies in [0, 1] for every query.

The **score** of the default ``hybrid`` ranking is ``(1 - λ) * dense + λ * lexical`` with a
per-query weight ``λ = bm25_weight * (top lexical - runner-up lexical)``: BM25 gets a say in
proportion to how clearly it singles out one entry for this query, and none when it scores several
entries alike (a query whose words are common to many entries). It is not a probability: it says
how closely the best phrasing of that entry matches the question, with a distinctive shared word
counting a little extra. With the bundled MiniLM, paraphrases of an entry typically score above 0.6
and unrelated questions below 0.4; the answer policy's thresholds (``supportbot calibrate``) are
set on this score. ``dense`` and ``bm25`` rankings return the single signal as the score.

Why this fusion (measured with ``benchmarks/retrieval.py``, same embeddings with whole answers in
the whole-entry vector, P@1 on StackFAQ / COVID-QA / demo): BM25 alone 0.675 / 0.492 / 0.352;
dense (answer_weight 0.5) 0.958 / 0.680 / 0.758; a fixed convex mix ``0.9 dense + 0.1 lexical`` 0.952 / 0.721 / 0.754 and ``0.8 / 0.2``
0.943 / 0.738 / 0.750 (a fixed BM25 share helps COVID-QA exactly where it hurts StackFAQ, whose
queries share few words with their entries); the margin-weighted mix shipped here (bm25_weight 0.2)
0.961 / 0.697 / 0.770, at least as good as the best single signal on every dev set, and flat for
bm25_weight 0.1-0.4 (with the shipped 64-token whole-entry vectors: 0.961 / 0.701 / 0.770, dense
0.961 / 0.689 / 0.758). Rank fusion with equal weights throws away how *close* a match is, which
hurts StackFAQ (0.831) and makes thresholds meaningless.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from knowledge_base.entry import FAQEntry, text_hash
from knowledge_base.index import DenseIndex, LexicalIndex
from knowledge_base.settings import KBSettings

__all__ = ["Reranker", "SearchHit", "Searcher", "rank", "rerank"]


@dataclass(frozen=True)
class SearchHit:
    entry: FAQEntry
    score: float
    dense: float = 0.0
    lexical: float = 0.0
    matched: str = field(default="", compare=False)
    """The phrasing (or "answer") that matched best: shown in the console's retrieval test."""

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.entry.id,
            "question": self.entry.question,
            "answer": self.entry.answer,
            "category": self.entry.category,
            "score": round(self.score, 4),
            "dense": round(self.dense, 4),
            "lexical": round(self.lexical, 4),
            "matched": self.matched,
        }


def _dense_of(
    index: DenseIndex,
    entry: FAQEntry,
    query: np.ndarray,
    answer_weight: float,
    learned: Mapping[str, str] | None = None,
) -> tuple[float, str]:
    """(dense score, best-matching phrasing) of one entry for a query vector. A learned phrasing
    (kind "l", from resolved questions) counts like an authored one; ``learned`` maps their hashes
    to their text, for ``matched``."""
    keys, vectors = index.vectors_of(entry.id)
    if not keys:
        return 0.0, ""
    cosines = vectors @ query
    best_q, best_hash, whole = 0.0, "", None
    for key, cos in zip(keys, cosines.tolist(), strict=True):
        if key.kind in ("q", "l") and cos > best_q:
            best_q, best_hash = cos, key.text_hash
        elif key.kind == "a":
            whole = max(cos, 0.0)
    texts = {text_hash(q): q for q in entry.questions} | dict(learned or {})
    matched = texts.get(best_hash, entry.question)
    if answer_weight > 0 and whole is not None:  # no whole-entry vector yet (a large upload): phrasings alone
        return (best_q + answer_weight * whole) / (1 + answer_weight), matched
    return max(best_q, 0.0), matched


def _lexical_margin(scores: dict[str, float]) -> float:
    """How clearly BM25 singles out one entry: its best normalized score minus the runner-up's."""
    best = heapq.nlargest(2, scores.values())
    return best[0] - (best[1] if len(best) > 1 else 0.0) if best else 0.0


def rank(
    query: str,
    query_vector: np.ndarray,
    *,
    dense: DenseIndex,
    lexical: LexicalIndex,
    entries: dict[str, FAQEntry],
    settings: KBSettings,
    k: int,
    allowed: set[str] | None = None,
    mode: str | None = None,
    learned: Mapping[str, Mapping[str, str]] | None = None,
) -> list[SearchHit]:
    """The ``k`` best entries for ``query`` (highest score first). ``learned``: per entry, its
    learned phrasings by text hash (shown as ``matched`` when one matches best)."""
    mode = mode or settings.retrieval
    pool = max(4 * k, 20)
    candidates: set[str] = set()
    if mode != "bm25":
        for vid, _ in dense.search(query_vector, pool * 2, allowed=allowed):
            candidates.add(dense.keys[vid].entry_id)
            if len(candidates) >= pool:
                break
    lexical_scores = lexical.scores(query, allowed=allowed, top=pool, include=candidates) if mode != "dense" else {}
    candidates.update(lexical_scores)
    weight = {"hybrid": settings.bm25_weight * _lexical_margin(lexical_scores), "dense": 0.0, "bm25": 1.0}[mode]
    hits = []
    for entry_id in candidates:
        entry = entries.get(entry_id)
        if entry is None:
            continue
        mine = learned.get(entry_id) if learned else None
        d, matched = _dense_of(dense, entry, query_vector, settings.answer_weight, mine) if weight < 1 else (0.0, "")
        lex = lexical_scores.get(entry_id, 0.0)
        hits.append(SearchHit(entry, (1 - weight) * d + weight * lex, d, lex, matched or entry.question))
    hits.sort(key=lambda h: (-h.score, h.entry.id))
    return hits[:k]


class Reranker(Protocol):
    """Scores (query, entry text) pairs in [0, 1]; see `knowledge_base.retrievers.CrossEncoderReranker`."""

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray: ...


def rerank_text(entry: FAQEntry) -> str:
    """What a cross-encoder reads of an entry (its first tokens matter; the model cuts the rest)."""
    return f"{entry.question}\n{entry.answer}"


def rerank(query: str, hits: list[SearchHit], reranker: Reranker, k: int) -> list[SearchHit]:
    """``hits`` reordered by the reranker, the ``k`` best.

    The reranked hits' ``score`` becomes the reranker's probability (``dense`` and ``lexical`` keep
    the bi-encoder's signals): a version with an enabled reranker has its thresholds calibrated on
    exactly this score, so the policy's "score >= threshold" keeps its meaning. Keeping the fused
    score while reordering would not: the first hit could score below the second, which the
    policy reads as a near tie and answers with "did you mean".
    """
    if not hits:
        return hits
    scores = reranker.score(query, [rerank_text(h.entry) for h in hits])
    out = [replace(h, score=float(s)) for h, s in zip(hits, scores.tolist(), strict=True)]
    out.sort(key=lambda h: (-h.score, h.entry.id))
    return out[:k]


class Searcher:
    """A ranking over fixed indexes with a given embedder (and optional reranker): what
    `KnowledgeBase.searcher` returns to evaluate a candidate retriever without serving it."""

    def __init__(
        self,
        embedder: object,
        dense: DenseIndex,
        lexical: LexicalIndex,
        entries: dict[str, FAQEntry],
        settings: KBSettings,
        *,
        reranker: Reranker | None = None,
        rerank_top: int = 10,
    ) -> None:
        self.embedder, self.dense, self.lexical, self.entries = embedder, dense, lexical, entries
        self.settings, self.reranker, self.rerank_top = settings, reranker, rerank_top

    def with_reranker(self, reranker: Reranker | None) -> Searcher:
        return Searcher(
            self.embedder,
            self.dense,
            self.lexical,
            self.entries,
            self.settings,
            reranker=reranker,
            rerank_top=self.rerank_top,
        )

    def rank_vector(self, query: str, vector: np.ndarray, k: int) -> list[SearchHit]:
        n = max(k, self.rerank_top) if self.reranker is not None else k
        hits = rank(
            query, vector, dense=self.dense, lexical=self.lexical, entries=self.entries, settings=self.settings, k=n
        )
        return rerank(query, hits, self.reranker, k) if self.reranker is not None else hits

    def search(self, query: str, k: int) -> list[SearchHit]:
        vector = self.embedder.embed_batch([query])[0]  # type: ignore[attr-defined]
        return self.rank_vector(query, vector, k)

    def search_many(self, queries: Sequence[str], k: int, *, batch_size: int = 64) -> list[list[SearchHit]]:
        """Like `search` for each query, embedding them in batches (mining and evaluation)."""
        vectors = self.embedder.embed(list(queries), batch_size=batch_size)  # type: ignore[attr-defined]
        return [self.rank_vector(q, v, k) for q, v in zip(queries, vectors, strict=True)]
