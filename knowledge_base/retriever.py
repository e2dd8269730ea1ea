"""Ranking FAQ entries for a customer's question, and what the score means.

Each entry is scored on two signals, both in [0, 1]:

* **dense** — cosine similarity between the query's embedding and the entry's closest question
  phrasing (every phrasing has its own vector), averaged with weight ``kb.answer_weight`` with the
  cosine to a vector of the whole entry (main question + answer): ``(q + w * qa) / (1 + w)``.
  The whole-entry vector catches questions worded like the answer rather than like the question.
  Negative cosines count as 0.
* **lexical** — BM25 over the entry's phrasings and answer, divided by the best score that query
  could reach (see `LexicalIndex.scores`), so it too lies in [0, 1] for every query.

The **score** of the default ``hybrid`` ranking is ``(1 - bm25_weight) * dense + bm25_weight *
lexical``. It is not a probability: it says how closely the best phrasing of that entry matches
the question, with words the two share counting a little extra. With the bundled MiniLM,
paraphrases of an entry typically score above 0.6 and unrelated questions below 0.4; the answer
policy's thresholds (``supportbot calibrate``) are set on this score. ``dense`` and ``bm25``
rankings return the single signal as the score.

Why this fusion (measured with ``benchmarks/retrieval.py``, P@1 on StackFAQ / COVID-QA / demo):
dense over questions alone 0.945 / 0.660 / 0.694; BM25 alone 0.675 / 0.484 / 0.336; the shipped
hybrid (answer_weight 0.5, bm25_weight 0.1) 0.952 / 0.721 / 0.746. Rank fusion with equal
weights throws away how *close* a match is, which hurts StackFAQ (0.831) and makes thresholds
meaningless; a convex combination of two calibrated scores keeps dense in charge and lets shared
rare words break near-ties.
"""

from __future__ import annotations

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


def _dense_of(index: DenseIndex, entry: FAQEntry, query: np.ndarray, answer_weight: float) -> tuple[float, str]:
    """(dense score, best-matching phrasing) of one entry for a query vector."""
    keys, vectors = index.vectors_of(entry.id)
    if not keys:
        return 0.0, ""
    cosines = vectors @ query
    best_q, best_hash, whole = 0.0, "", 0.0
    for key, cos in zip(keys, cosines.tolist(), strict=True):
        if key.kind == "q" and cos > best_q:
            best_q, best_hash = cos, key.text_hash
        elif key.kind == "a":
            whole = max(cos, 0.0)
    matched = {text_hash(q): q for q in entry.questions}.get(best_hash, entry.question)
    if answer_weight > 0:
        return (best_q + answer_weight * whole) / (1 + answer_weight), matched
    return max(best_q, 0.0), matched


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
) -> list[SearchHit]:
    """The ``k`` best entries for ``query`` (highest score first)."""
    mode = mode or settings.retrieval
    pool = max(4 * k, 20)
    lexical_scores = lexical.scores(query, allowed=allowed) if mode != "dense" else {}
    candidates: set[str] = set()
    if mode != "bm25":
        for vid, _ in dense.search(query_vector, pool * 2, allowed=allowed):
            candidates.add(dense.keys[vid].entry_id)
            if len(candidates) >= pool:
                break
    candidates.update(sorted(lexical_scores, key=lexical_scores.__getitem__, reverse=True)[:pool])
    weight = {"hybrid": settings.bm25_weight, "dense": 0.0, "bm25": 1.0}[mode]
    hits = []
    for entry_id in candidates:
        entry = entries.get(entry_id)
        if entry is None:
            continue
        d, matched = _dense_of(dense, entry, query_vector, settings.answer_weight) if weight < 1 else (0.0, "")
        lex = lexical_scores.get(entry_id, 0.0)
        hits.append(SearchHit(entry, (1 - weight) * d + weight * lex, d, lex, matched or entry.question))
    hits.sort(key=lambda h: (-h.score, h.entry.id))
    return hits[:k]
