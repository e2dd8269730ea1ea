"""Labelled traffic: customer wordings resolved to the FAQ entry that answers them (or does not).

Every resolution the product sees — a clarify option clicked, a thumbs up or down, the console's
"add as phrasing", "assign to entry", a correction, an operator's annotation of a conversation turn,
the API, or a team's own log imported with ``supportbot kb learn`` — becomes one
:class:`LabelledExample` in the ``examples`` table of the knowledge base's SQLite file. The table is
the truth; the *learned phrasings* derived from it (a dense vector of kind ``"l"`` per distinct
positive wording, see :func:`select_learned`) are rebuilt from it like every other index.

The query is stored as the caller gives it: the chatbot layer redacts personal data first
(`chatbot.learning`), the knowledge base never sees raw customer text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from knowledge_base.entry import normalize_text
from knowledge_base.errors import IngestError, Problem

__all__ = [
    "MERGE_COSINE",
    "SOURCES",
    "LabelledExample",
    "learned_key",
    "read_examples_file",
    "select_learned",
]

#: Where an example came from; the console and the API filter on it.
SOURCES = (
    "clarify",
    "thumbs_up",
    "thumbs_down",
    "phrasing",
    "assign",
    "correction",
    "annotation",
    "api",
    "import",
)

MERGE_COSINE = 0.97
"""A learned wording this close (cosine) to a phrasing or an already learned wording of the same
entry adds no vector: it would only repeat that one in the ranking (the example is still stored)."""


@dataclass(frozen=True)
class LabelledExample:
    id: int
    query: str
    """The customer's wording, as redacted by the caller."""
    entry_id: str
    source: str
    """One of :data:`SOURCES`."""
    positive: bool
    """False: a thumbs-down, "this entry was wrong for this query"."""
    created_at: float
    """Unix time."""
    conversation_id: str | None = None
    message_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def learned_key(text: str) -> str:
    """What makes two wordings the same learned phrasing: normalised, case and spacing folded."""
    return " ".join(normalize_text(text).casefold().split()).rstrip("?!. ")


def select_learned(candidates: Sequence[str], vectors: np.ndarray, authored: np.ndarray, *, cap: int) -> list[int]:
    """Which candidate wordings (newest first, distinct by `learned_key`, none equal to an authored
    phrasing) become learned phrasings: the first ``cap`` whose vector is below `MERGE_COSINE` to
    every authored phrasing vector and to every wording kept before it. Returns their positions."""
    kept: list[int] = []
    pool = np.asarray(authored, np.float32).reshape(-1, vectors.shape[1]) if len(vectors) else authored
    for i in range(len(candidates)):
        if len(kept) >= cap:
            break
        if len(pool) and float(np.max(pool @ vectors[i])) >= MERGE_COSINE:
            continue
        kept.append(i)
        pool = np.vstack([pool, vectors[i][None, :]])
    return kept


def read_examples_file(path: Path, known_ids: Iterable[str], *, max_chars: int) -> list[tuple[str, str]]:
    """``(query, faq_id)`` rows of a JSONL log (``{"query": ..., "faq_id": ...}`` per line).

    All or nothing, like the FAQ loaders: every bad row is reported at once (file, line, what, the
    fix) and nothing is returned unless all rows are good. An ``faq_id`` the knowledge base does
    not have is a row error."""
    known = set(known_ids)
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError([Problem(str(path), f"cannot read: {exc}", "give a UTF-8 JSONL file")]) from exc
    problems: list[Problem] = []
    rows: list[tuple[str, str]] = []
    name = Path(path).name
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(where, f"not valid JSON ({exc.msg})", 'write one {"query", "faq_id"} per line'))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(where, "not a JSON object", 'write {"query": "...", "faq_id": "..."}'))
            continue
        query, faq_id = row.get("query"), row.get("faq_id")
        if not isinstance(query, str) or not normalize_text(query):
            problems.append(Problem(where, "no query text", 'add "query": the customer\'s question'))
            continue
        if len(normalize_text(query)) > max_chars:
            problems.append(
                Problem(where, f"the query is over {max_chars} characters", "keep the question itself, or drop the row")
            )
            continue
        if not isinstance(faq_id, (str, int)) or not str(faq_id).strip():
            problems.append(Problem(where, "no faq_id", 'add "faq_id": the id of the entry that answers it'))
            continue
        if str(faq_id) not in known:
            problems.append(
                Problem(
                    where,
                    f"faq_id {str(faq_id)!r} is not in the knowledge base",
                    "use an id from `supportbot kb list`, or add the entry first",
                )
            )
            continue
        rows.append((normalize_text(query), str(faq_id)))
    if problems:
        raise IngestError(problems, title=f"{name} has problems; nothing was learned")
    if not rows:
        raise IngestError([Problem(name, "no rows", 'write one {"query", "faq_id"} object per line')])
    return rows
