"""Prompts as text files in ``chatbot/prompts/``, and the one function that lays them out.

The fine-tuning recipe builds its training text with the same functions, so the model is trained
on exactly the text it sees when serving (``finetune.data`` imports :func:`build_messages`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Protocol

__all__ = ["build_closed_book_messages", "build_messages", "format_context", "load_prompt"]

PROMPT_DIR = Path(__file__).parent / "prompts"


class _Entry(Protocol):
    @property
    def question(self) -> str: ...
    @property
    def answer(self) -> str: ...


@cache
def load_prompt(name: str) -> str:
    return (PROMPT_DIR / f"{name}.txt").read_text(encoding="utf-8").strip()


def format_context(entries: Sequence[_Entry]) -> str:
    return "\n\n".join(f"[{i}] Q: {e.question}\nA: {e.answer}" for i, e in enumerate(entries, 1))


def build_messages(
    question: str,
    entries: Sequence[_Entry],
    history: Sequence[tuple[str, str]] = (),
    *,
    system: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for a retrieval-augmented answer: system, earlier turns, entries + question.

    ``history`` is (role, text) pairs, oldest first, already trimmed to the context window.
    """
    messages = [{"role": "system", "content": system or load_prompt("system")}]
    messages += [{"role": role, "content": text} for role, text in history]
    user = load_prompt("context").format(context=format_context(entries), question=question.strip())
    messages.append({"role": "user", "content": user})
    return messages


def build_closed_book_messages(question: str, *, system: str | None = None) -> list[dict[str, str]]:
    """The same system prompt without entries: what the model knows on its own (for evaluation)."""
    return [
        {"role": "system", "content": system or load_prompt("system")},
        {"role": "user", "content": load_prompt("closed_book").format(question=question.strip())},
    ]
