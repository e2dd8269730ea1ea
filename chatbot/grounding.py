"""Checks on a generated answer before a customer sees it.

* **Grounding**: most content words of the answer must occur in the entries it was given
  (word stems, stopwords ignored). Small models that ignore their context invent prices,
  links and steps; those words are not in the sources, so such answers fail and the engine
  falls back to the FAQ entry itself or to a hand-off.
* **Refusal**: "I don't know" (the prompt asks for exactly that) means hand off.
* **Leaks**: the answer must not repeat the system prompt or any configured secret, whatever a
  user message asked for (prompt injection). The prompt never contains other customers'
  conversations, so those cannot leak through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from knowledge_base.index import tokenize

__all__ = ["grounding_score", "is_refusal", "leaks", "shingles"]

_REFUSAL = re.compile(r"\b(i don['’]?t know|i do not know|i['’]?m not sure|cannot answer|can['’]?t answer)\b", re.I)


def grounding_score(answer: str, sources: Sequence[str], question: str = "") -> float:
    """Share of the answer's content words found in the sources (or the question), in [0, 1]."""
    words = tokenize(answer)
    if not words:
        return 0.0
    known = set(tokenize(" ".join(sources))) | set(tokenize(question))
    return sum(w in known for w in words) / len(words)


def is_refusal(answer: str) -> bool:
    """Whether an answer declines (empty, or "I don't know" and the like near its start): the
    engine hands such answers off, and the fine-tune evaluation counts them with this same test."""
    return not answer.strip() or bool(_REFUSAL.search(answer[:200]))


def shingles(text: str, n: int = 6) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive lower-cased words: shared runs mean copied text."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 0))}


def leaks(answer: str, *, system_prompt: str, secrets: Iterable[str] = ()) -> str | None:
    """What the answer leaks ("system prompt", "secret"), or None."""
    lowered = answer.lower()
    for secret in secrets:
        if secret and len(secret) >= 6 and secret.lower() in lowered:
            return "secret"
    if shingles(answer) & shingles(system_prompt):
        return "system prompt"
    return None
