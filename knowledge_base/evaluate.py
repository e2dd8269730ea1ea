"""Retrieval metrics on labelled queries: P@1, hit@5 and MRR@10, overall and per category.

A labelled query names its answer with ``faq_id`` or, when several entries answer it together,
``relevant_faq_ids`` (any of them counts as a hit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from knowledge_base.errors import IngestError, Problem

__all__ = ["read_jsonl", "relevant_ids", "retrieval_metrics"]


def read_jsonl(path: Path, *, require: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file of queries; every problem is reported at once with its line."""
    problems, rows = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError([Problem(str(path), f"cannot read: {exc}", "give a UTF-8 JSONL file")]) from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"{path}:{number}", f"not valid JSON ({exc.msg})", "one JSON object per line"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(f"{path}:{number}", "not a JSON object", 'write {"query": "..."} per line'))
            continue
        missing = [k for k in require if k not in row]
        if missing:
            problems.append(Problem(f"{path}:{number}", f"missing {', '.join(missing)}", "add the field"))
            continue
        rows.append(row)
    if problems:
        raise IngestError(problems, title="the queries file has problems")
    return rows


def relevant_ids(row: dict[str, Any]) -> set[str]:
    if row.get("relevant_faq_ids"):
        return {str(i) for i in row["relevant_faq_ids"]}
    return {str(row["faq_id"])} if row.get("faq_id") else set()


def _summary(ranks: list[int | None]) -> dict[str, float]:
    n = len(ranks) or 1
    return {
        "queries": len(ranks),
        "p@1": sum(r == 1 for r in ranks) / n,
        "hit@5": sum(r is not None and r <= 5 for r in ranks) / n,
        "mrr@10": sum(1.0 / r for r in ranks if r is not None and r <= 10) / n,
    }


def retrieval_metrics(
    rows: Iterable[dict[str, Any]],
    ranked_ids: Callable[[str], list[str]],
    *,
    category_of: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Metrics for each labelled row; ``ranked_ids(query)`` returns entry ids best first (>= 10)."""
    overall: list[int | None] = []
    by_category: dict[str, list[int | None]] = {}
    for row in rows:
        gold = relevant_ids(row)
        if not gold:
            continue
        ranking = ranked_ids(str(row["query"]))
        rank = next((i for i, entry_id in enumerate(ranking, 1) if entry_id in gold), None)
        overall.append(rank)
        category = row.get("category") or (category_of(next(iter(gold))) if category_of else "") or "(none)"
        by_category.setdefault(str(category), []).append(rank)
    return {
        "overall": _summary(overall),
        "by_category": {c: _summary(r) for c, r in sorted(by_category.items())},
    }
