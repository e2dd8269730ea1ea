"""The answer policy: from ranked FAQ entries to one of four modes, without calling any model.

    score >= faq_threshold, clear lead          -> faq        the entry's own answer, verbatim
    top two within clarify_margin (relevant)    -> clarify    "Did you mean ...?" with both
    relevance_threshold <= score < faq          -> generated  the LLM answers from the top entries
    multi-part question over several entries    -> generated
    score < relevance_threshold, or no entries  -> handoff    a person takes over

Scores are the retriever's (see `knowledge_base.retriever`); ``supportbot calibrate`` measures
where the thresholds should sit for a given knowledge base and embedder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from chatbot.settings import PolicySettings
from knowledge_base.retriever import SearchHit

__all__ = ["MODES", "THRESHOLD_FIELDS", "Decision", "decide", "is_multi_part"]

MODES = ("faq", "clarify", "generated", "handoff")
#: The settings `supportbot calibrate` tunes, and that a retriever version carries (thresholds.json).
THRESHOLD_FIELDS = ("relevance_threshold", "faq_threshold", "clarify_margin")
_MULTI = re.compile(r"\b(and|also|as well as|plus|both)\b|\?.+\?", re.IGNORECASE)


@dataclass(frozen=True)
class Decision:
    mode: str
    hits: list[SearchHit] = field(default_factory=list)
    """The entries the answer rests on: one for faq, the options for clarify, the context for generated."""
    reason: str = ""


def is_multi_part(question: str) -> bool:
    """A question that asks two things ("can I return X and get a refund to PayPal?")."""
    return bool(_MULTI.search(question.strip()))


def decide(question: str, hits: list[SearchHit], settings: PolicySettings) -> Decision:
    if not hits or hits[0].score < settings.relevance_threshold:
        best = f"{hits[0].score:.3f}" if hits else "none"
        return Decision("handoff", [], f"best score {best} < relevance threshold {settings.relevance_threshold}")
    top = hits[0]
    relevant = [h for h in hits if h.score >= settings.relevance_threshold]
    close = [h for h in relevant if top.score - h.score < settings.clarify_margin]
    distinct_close = [h for h in close if h.entry.answer != top.entry.answer or h is top]
    if settings.generate and len(relevant) > 1 and is_multi_part(question):
        second = relevant[1]
        if second.score >= settings.relevance_threshold + (settings.faq_threshold - settings.relevance_threshold) / 2:
            return Decision("generated", relevant[: settings.max_context_entries], "question combines several entries")
    if len(distinct_close) > 1:
        options = distinct_close[: settings.max_clarify_options]
        return Decision("clarify", options, f"top {len(options)} within {settings.clarify_margin} of each other")
    if top.score >= settings.faq_threshold:
        return Decision("faq", [top], f"score {top.score:.3f} >= faq threshold {settings.faq_threshold}")
    if settings.generate:
        return Decision("generated", relevant[: settings.max_context_entries], "relevant entries, no confident match")
    options = relevant[: settings.max_clarify_options]
    if len(options) > 1:
        return Decision("clarify", options, "generation is off: offer the relevant entries")
    return Decision("faq", [top], "generation is off: the only relevant entry")
