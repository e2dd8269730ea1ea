"""Follow-up resolution: turn "and how long does that take?" into a question retrieval can use.

A measured heuristic instead of an LLM rewrite (the bundled 135M model rewrites poorly and costs
a second or more per turn): a message that looks elliptic — short, opening with "and"/"what
about", or leaning on "it"/"that" — is searched twice, alone and appended to the previous
question, and each entry is ranked by the mean of its two scores. An entry must then match both
what was just said and the conversation's topic; neither search alone can drag the answer away.
Measured on the demo ``followups.jsonl`` by ``benchmarks/chat.py`` (last turn's top-1 right: message
alone 0.514, the better of the two searches by top score 0.571, the mean of both 0.714). The mean is
also the hits' score, so the policy hands off a follow-up that only one search supports (1 wrong
answer in 35 instead of 5 when scored by the better search).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from knowledge_base.retriever import SearchHit

__all__ = ["is_elliptic", "resolve_followup"]

_OPENERS = re.compile(r"^\s*(and|but|also|so|then|what about|how about|ok(ay)?|what if|same for|or)\b", re.I)
_ANAPHORA = re.compile(r"\b(it|that|this|those|these|them|they|there|one|ones|its|such)\b", re.I)


def is_elliptic(message: str) -> bool:
    words = re.findall(r"\w+", message)
    if not words:
        return False
    return len(words) <= 4 or bool(_OPENERS.match(message)) or (len(words) <= 12 and bool(_ANAPHORA.search(message)))


def resolve_followup(
    message: str, previous_questions: Sequence[str], search: Callable[[str, int], list[SearchHit]], k: int
) -> tuple[str, list[SearchHit]]:
    """(the question to answer, its ``k`` best entries) for ``message`` in a conversation whose
    earlier resolved questions are ``previous_questions``.

    Not a follow-up: the message and its own hits. A follow-up: the previous question + the message
    (what the answer and the prompt are about), with hits scored by the mean of both searches.
    """
    if not previous_questions or not is_elliptic(message):
        return message, search(message, k)
    combined = f"{previous_questions[-1].rstrip('?. ')}? {message.strip()}"
    pool = max(2 * k, 10)
    first: dict[str, SearchHit] = {}
    total: dict[str, float] = {}
    for text in (message, combined):
        for hit in search(text, pool):
            first.setdefault(hit.entry.id, hit)
            total[hit.entry.id] = total.get(hit.entry.id, 0.0) + hit.score / 2
    ranked = sorted(total, key=lambda i: (-total[i], i))[:k]
    return combined, [dataclasses.replace(first[i], score=total[i]) for i in ranked]
