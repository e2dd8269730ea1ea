"""Release a generated answer to the customer sentence by sentence, each time after the guard.

The model's draft is held back until the text shown so far *plus* the next complete sentence(s)
passes the same checks as a whole answer (`chatbot.grounding`: no leak, no refusal, grounded in the
entries). The customer therefore only ever sees a prefix that the guard accepted, and the final
answer is exactly that prefix: nothing visible is replaced or withdrawn afterwards. A sentence that
fails stays held; it is released later if further grounded sentences lift the whole above the
threshold, else it is dropped with everything after it. A leak stops the generation at once.

Why sentences and not the whole answer: on the bundled model on a CPU the first sentence is ready
after ~1-3 s, the whole answer after 10-35 s (docs/chat.md, "Guarded streaming").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["GuardCheck", "SentenceGuard"]

#: The end of a sentence: ., ! or ? (optionally closed by a quote or bracket) before white space,
#: or the end of a line (list items, paragraphs). The white space stays pending, so the released
#: text never ends with it and the concatenated deltas equal the final answer.
_BOUNDARY = re.compile(r"[.!?][\"')\]]*(?=\s)|(?<=\S)(?=\n)")


@dataclass(frozen=True)
class GuardCheck:
    """What the guard says about a candidate text: ``ok``; ``stop`` for a leak (never recoverable)."""

    ok: bool
    reason: str = ""
    stop: bool = False


class SentenceGuard:
    """Feed it the model's chunks; it returns the text that may be shown now."""

    def __init__(self, check: Callable[[str], GuardCheck]) -> None:
        self._check = check
        self.released = ""
        self.pending = ""
        self.stopped = False
        self.last_reason = ""

    def _try(self, upto: int) -> str:
        candidate = self.released + self.pending[:upto]
        verdict = self._check(candidate.strip())
        self.last_reason = verdict.reason
        if verdict.stop:
            self.stopped = True
            self.pending = ""
            return ""
        if not verdict.ok:
            return ""
        out = self.pending[:upto]
        if not self.released:
            out = out.lstrip()
        self.released += out
        self.pending = self.pending[upto:]
        return out

    def feed(self, chunk: str) -> str:
        """Add a chunk of the draft; the newly released text ("" while held)."""
        if self.stopped:
            return ""
        self.pending += chunk
        ends = [m.end() for m in _BOUNDARY.finditer(self.pending)]
        if not ends:
            # A leak can hide in an unfinished sentence: check what is pending, release nothing.
            if self._check((self.released + self.pending).strip()).stop:
                self.stopped = True
                self.pending = ""
            return ""
        return self._try(ends[-1])

    def finish(self) -> str:
        """The draft is complete: release the rest if the whole passes."""
        if self.stopped or not self.pending.strip():
            return ""
        self.pending = self.pending.rstrip()
        return self._try(len(self.pending))

    @property
    def withheld(self) -> str:
        """The part of the draft the customer never saw."""
        return self.pending
