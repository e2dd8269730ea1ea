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
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from knowledge_base.entry import FAQEntry, text_hash
from knowledge_base.index import DenseIndex, LexicalIndex
from knowledge_base.settings import KBSettings

__all__ = ["SearchHit", "rank"]


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
