"""Grouping the questions the bot could not answer into the common issues customers hit.

The support console shows the unanswered queue as clusters ("12 customers asked about gift
wrapping") instead of a flat list, so one fix (a new FAQ entry, or another phrasing of an existing
one) closes many queue items at once.

The clustering is greedy and deterministic, on the knowledge base's own embedder:

1. exact repeats (case, spacing and punctuation folded) are merged first, so a question asked 30
   times is embedded once and weighs 30;
2. every distinct question's neighbours are the questions at cosine similarity >= ``threshold``;
3. the question with the most (weighted) unassigned neighbours founds a cluster with all of them;
   repeat until every question is assigned (a lone question is a cluster of one).

It is O(n²) in the number of distinct questions (a 1,000-item queue is a 1,000 × 1,000 similarity
matrix, a few milliseconds), needs no number of clusters up front, and never chains unrelated
questions together through intermediate ones the way single-linkage clustering does: every member
is within ``threshold`` of its founder. The label is the most central member (highest total weighted
similarity to the others), a real customer question rather than a synthetic summary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from knowledge_base.embeddings import Embedder

__all__ = ["DEFAULT_THRESHOLD", "Cluster", "cluster_questions", "cluster_unanswered"]

#: Cosine similarity for "the same issue" with the default embedder (all-MiniLM-L6-v2): paraphrases
#: of one question score about 0.6-0.9 there, unrelated questions below 0.4 (measured on customer
#: questions in tests/test_ui.py::test_real_embeddings_group_paraphrases).
DEFAULT_THRESHOLD = 0.6


@dataclass
class Cluster:
    """Questions that ask about the same thing."""

    label: str
    """The most central question: what the cluster is about."""
    questions: list[str]
    """Every distinct wording in the cluster (as first seen), the label first."""
    indices: list[int]
    """Positions in the input of every question in the cluster (repeats included)."""
    count: int
    """How many questions (repeats included): how often customers hit this issue."""
    ids: list[Any] = field(default_factory=list)
    """The queue items' ids (with :func:`cluster_unanswered`), aligned with ``indices``."""
    first_seen: str = ""
    last_seen: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "count": self.count,
            "questions": list(self.questions),
            "indices": list(self.indices),
            "ids": list(self.ids),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }


def _fold(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


def cluster_questions(
    questions: Sequence[str], embedder: Embedder, threshold: float = DEFAULT_THRESHOLD
) -> list[Cluster]:
    """Group ``questions`` by meaning; clusters sorted by size (largest first), then label.

    ``threshold`` is the cosine similarity in [0, 1] a question needs with its cluster's founder;
    higher gives smaller, tighter clusters. Empty or whitespace-only questions are left out.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    # Distinct questions (by folded text), their weights and the input positions of their repeats.
    keys: dict[str, int] = {}
    texts: list[str] = []
    positions: list[list[int]] = []
    for index, question in enumerate(questions):
        text = " ".join(str(question).split())
        key = _fold(text) or text.casefold()
        if not key:
            continue
        slot = keys.get(key)
        if slot is None:
            keys[key] = slot = len(texts)
            texts.append(text)
            positions.append([])
        positions[slot].append(index)
    if not texts:
        return []
    weights = np.array([len(p) for p in positions], dtype=np.float64)
    vectors = np.asarray(embedder.embed(texts), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)
    similarity = np.clip(vectors @ vectors.T, -1.0, 1.0)
    adjacent = similarity >= threshold - 1e-9
    np.fill_diagonal(adjacent, True)

    unassigned = np.ones(len(texts), dtype=bool)
    clusters: list[Cluster] = []
    while unassigned.any():
        # Weighted count of unassigned neighbours; ties go to the earlier question (stable order).
        density = (adjacent[:, unassigned] * weights[unassigned]).sum(axis=1)
        density[~unassigned] = -1.0
        founder = int(np.argmax(density))
        members = np.flatnonzero(adjacent[founder] & unassigned)
        unassigned[members] = False
        # Most central member: the highest weighted similarity to the whole cluster.
        centrality = similarity[np.ix_(members, members)] @ weights[members]
        centre = int(members[int(np.argmax(centrality))])
        ordered = [centre, *[int(m) for m in members if m != centre]]
        indices = sorted(i for m in ordered for i in positions[m])
        clusters.append(
            Cluster(
                label=texts[centre],
                questions=[texts[m] for m in ordered],
                indices=indices,
                count=len(indices),
            )
        )
    clusters.sort(key=lambda c: (-c.count, c.label.casefold()))
    return clusters


def cluster_unanswered(items: Sequence[Any], embedder: Embedder, threshold: float = DEFAULT_THRESHOLD) -> list[Cluster]:
    """Cluster queue items (:class:`chatbot.store.UnansweredQuestion`, or anything with
    ``id``, ``question`` and ``created_at``); each cluster gets the items' ids and its date range."""
    clusters = cluster_questions([item.question for item in items], embedder, threshold)
    for cluster in clusters:
        members = [items[i] for i in cluster.indices]
        cluster.ids = [item.id for item in members]
        dates = sorted(str(getattr(item, "created_at", "") or "") for item in members)
        cluster.first_seen, cluster.last_seen = (dates[0], dates[-1]) if dates else ("", "")
    return clusters
