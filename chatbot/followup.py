"""Follow-up resolution: turn "and how long does that take?" into a question retrieval can use.

A measured heuristic instead of an LLM rewrite (the bundled 135M model rewrites poorly and costs
a second or more per turn): a message that looks elliptic — short, opening with "and"/"what
about", or leaning on "it"/"that" — is searched together with the previous question, and the
combination wins only if it retrieves at least as well as the message alone. Measured on the demo
``followups.jsonl`` by ``benchmarks/chat.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = ["is_elliptic", "resolve_followup"]

_OPENERS = re.compile(r"^\s*(and|but|also|so|then|what about|how about|ok(ay)?|what if|same for|or)\b", re.I)
_ANAPHORA = re.compile(r"\b(it|that|this|those|these|them|they|there|one|ones|its|such)\b", re.I)


def is_elliptic(message: str) -> bool:
    words = re.findall(r"\w+", message)
    if not words:
        return False
    return len(words) <= 4 or bool(_OPENERS.match(message)) or (len(words) <= 12 and bool(_ANAPHORA.search(message)))


def resolve_followup(
    message: str,
    previous_questions: Sequence[str],
    top_score: Callable[[str], float],
    *,
    margin: float = 0.02,
) -> str:
    """The question to retrieve with: the message itself, or the previous question + the message."""
    if not previous_questions or not is_elliptic(message):
        return message
    combined = f"{previous_questions[-1].rstrip('?. ')}? {message.strip()}"
    if top_score(combined) + margin >= top_score(message):
        return combined
    return message
