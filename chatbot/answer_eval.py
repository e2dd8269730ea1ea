"""Answer metrics (what customers get) and threshold calibration, on labelled and out-of-scope queries.

For a labelled (in-scope) query an answer is
  * **right**: mode faq/generated and its first source is a relevant entry,
  * **wrong**: mode faq/generated with another entry first (the costly case: a confident wrong answer),
  * **clarify**: "did you mean" (``clarify_hit`` when a relevant entry is among the options),
  * **handed off**: mode handoff.
For an out-of-scope query the only good outcome is a hand-off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from chatbot.policy import decide
from chatbot.settings import PolicySettings
from knowledge_base.evaluate import relevant_ids
from knowledge_base.retriever import SearchHit

__all__ = ["answer_metrics", "calibrate", "outcome", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def outcome(mode: str, sources: Sequence[str], gold: set[str]) -> str:
    if mode == "handoff":
        return "handoff"
    if mode == "clarify":
        return "clarify_hit" if gold & set(sources) else "clarify_miss"
    return "right" if sources and sources[0] in gold else "wrong"


def answer_metrics(
    positives: Sequence[tuple[dict[str, Any], str, list[str], float]],
    negatives: Sequence[tuple[str, float]] = (),
) -> dict[str, Any]:
    """``positives``: (row, mode, sources, latency_ms); ``negatives``: (mode, latency_ms)."""
    n = len(positives) or 1
    outcomes = Counter(outcome(mode, sources, relevant_ids(row)) for row, mode, sources, _ in positives)
    latencies = [lat for *_, lat in positives] + [lat for _, lat in negatives]
    by_mode: dict[str, list[float]] = {}
    for _, mode, _, lat in positives:
        by_mode.setdefault(mode, []).append(lat)
    for mode, lat in negatives:
        by_mode.setdefault(mode, []).append(lat)
    out: dict[str, Any] = {
        "queries": len(positives),
        "mode_mix": dict(Counter(mode for _, mode, _, _ in positives)),
        "right_source": outcomes["right"] / n,
        "wrong_source": outcomes["wrong"] / n,
        "clarify": (outcomes["clarify_hit"] + outcomes["clarify_miss"]) / n,
        "clarify_with_right_option": outcomes["clarify_hit"] / n,
        "handed_off": outcomes["handoff"] / n,
        "latency_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95)},
        "latency_ms_by_mode": {
            m: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)} for m, v in sorted(by_mode.items())
        },
    }
    if negatives:
        out["negatives"] = len(negatives)
        out["negatives_mode_mix"] = dict(Counter(mode for mode, _ in negatives))
        out["negatives_handed_off"] = sum(mode == "handoff" for mode, _ in negatives) / len(negatives)
    return out


def _simulate(
    policy: PolicySettings,
    positives: Sequence[tuple[dict[str, Any], list[SearchHit]]],
    negatives: Sequence[list[SearchHit]],
) -> dict[str, float]:
    outcomes: Counter[str] = Counter()
    for row, hits in positives:
        d = decide(str(row["query"]), hits, policy)
        outcomes[outcome(d.mode, [h.entry.id for h in d.hits], relevant_ids(row))] += 1
    n = len(positives) or 1
    neg_handoff = sum(decide("", hits, policy).mode == "handoff" for hits in negatives) / (len(negatives) or 1)
    return {
        "right": outcomes["right"] / n,
        "wrong": outcomes["wrong"] / n,
        "clarify": (outcomes["clarify_hit"] + outcomes["clarify_miss"]) / n,
        "handoff": outcomes["handoff"] / n,
        "negatives_handed_off": neg_handoff,
    }


def calibrate(
    policy: PolicySettings,
    positives: Sequence[tuple[dict[str, Any], list[SearchHit]]],
    negatives: Sequence[list[SearchHit]],
    *,
    min_negative_handoff: float = 0.95,
    max_wrong: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Sweep the thresholds on cached retrieval results; suggest the best setting that meets the goals.

    Goal: hand off at least ``min_negative_handoff`` of out-of-scope questions and answer at most
    ``max_wrong`` of in-scope ones with a wrong source; among those, the most right answers
    (then the fewest hand-offs). Generation is simulated as answering from the top entry.
    """
    grid = [round(0.30 + 0.02 * i, 2) for i in range(31)]
    margins = [0.0, 0.01, 0.02, 0.03, 0.05]
    curve, best, best_key = [], None, None
    total = len(grid)
    for i, relevance in enumerate(grid):
        for faq in [t for t in grid if t >= relevance]:
            for margin in margins:
                candidate = replace(policy, relevance_threshold=relevance, faq_threshold=faq, clarify_margin=margin)
                result = _simulate(candidate, positives, negatives)
                row = {"relevance_threshold": relevance, "faq_threshold": faq, "clarify_margin": margin, **result}
                if faq == relevance and margin == policy.clarify_margin:
                    curve.append(row)
                ok = result["negatives_handed_off"] >= min_negative_handoff and result["wrong"] <= max_wrong
                key = (ok, result["right"] if ok else -result["wrong"], -result["handoff"], faq)
                if best_key is None or key > best_key:
                    best, best_key = row, key
        if progress:
            progress(i + 1, total)
    current = _simulate(policy, positives, negatives)
    return {
        "current": {
            "relevance_threshold": policy.relevance_threshold,
            "faq_threshold": policy.faq_threshold,
            "clarify_margin": policy.clarify_margin,
            **current,
        },
        "suggested": best,
        "meets_goals": bool(best_key and best_key[0]),
        "goals": {"min_negative_handoff": min_negative_handoff, "max_wrong": max_wrong},
        "curve": curve,
    }
