"""The FAQ entry: one answer and every phrasing of the question it answers."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field, replace

__all__ = ["FAQEntry", "content_id", "normalize_text", "text_hash"]


def _strip_control(line: str) -> str:
    """Drop control and format characters (Unicode category C: zero-width spaces, BOMs, NULs) but tabs.

    Most lines are printable, which ``str.isprintable`` checks in C; only the rest pay for the
    per-character test (that loop, run on every line, was 80% of a large file's load time).
    """
    if line.isprintable():
        return line
    return "".join(ch for ch in line if ch == "\t" or unicodedata.category(ch)[0] != "C")


def normalize_text(text: str) -> str:
    """Unicode NFC, no control characters, single spaces; newlines inside answers are kept."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t]+", " ", _strip_control(line)).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_id(question: str) -> str:
    """A stable id for an entry uploaded without one, derived from its main question.

    Derived from the question alone (case and punctuation folded), so fixing a typo in the answer
    and re-uploading updates the entry instead of adding a twin.
    """
    key = re.sub(r"[^\w]+", " ", question.casefold()).strip()
    return "faq-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class FAQEntry:
    id: str
    question: str
    answer: str
    alt_questions: tuple[str, ...] = ()
    category: str = ""
    tags: tuple[str, ...] = ()
    enabled: bool = True
    source: str = ""
    created_at: str = ""
    updated_at: str = ""
    hits: int = 0
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def questions(self) -> tuple[str, ...]:
        """Every phrasing, main question first; each one is searchable."""
        return (self.question, *self.alt_questions)

    @property
    def content_hash(self) -> str:
        """Changes when anything a customer sees or searches changes (not timestamps or counters)."""
        payload = json.dumps(
            [
                self.question,
                list(self.alt_questions),
                self.answer,
                self.category,
                list(self.tags),
                self.enabled,
            ],
            ensure_ascii=False,
        )
        return text_hash(payload)

    def with_changes(self, **changes: object) -> FAQEntry:
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "question": self.question,
            "alt_questions": list(self.alt_questions),
            "answer": self.answer,
            "category": self.category,
            "tags": list(self.tags),
            "enabled": self.enabled,
            "source": self.source,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "hits": self.hits,
        }
