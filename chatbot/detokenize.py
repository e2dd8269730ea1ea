"""Incremental detokenisation: a growing answer's text, decoding only its newest tokens.

Decoding the whole answer again for every token costs O(n²) tokenizer work per answer; with 32
streams sharing one batch that work runs in 32 Python threads competing for the GIL with the
scheduler's thread (issue #18). :class:`IncrementalDetokenizer` decodes a short window instead: the
tokens already shown since the last emitted boundary (``prefix``) plus the new ones, and emits what
the window's text gained. As in transformers' ``TextIteratorStreamer`` and vLLM's incremental
detokenizer, decoding the window from a token boundary that was already shown keeps byte-level BPE
merges and SentencePiece's leading-space rules the same as in the full decode, and text that ends
in a split multi-byte character (U+FFFD) is held back until its last byte arrives.

:meth:`IncrementalDetokenizer.finish` compares the streamed text with one full decode and returns
whatever the full text has beyond it, so the stream's text always ends up equal to the full decode
when it is a continuation of what was sent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDetokenizer"]


class IncrementalDetokenizer:
    """Turns token ids, as they arrive, into text deltas whose concatenation is the full decode."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # first token of the decode window (already shown)
        self._read = 0  # tokens before this are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def add(self, ids: list[int]) -> str:
        """Append ``ids``; the text they complete (may be empty while a character is split)."""
        self.tokens.extend(ids)
        prefix_text = self._decode(self.tokens[self._prefix : self._read])
        window_text = self._decode(self.tokens[self._prefix :])
        if len(window_text) <= len(prefix_text) or window_text.endswith("\ufffd"):
            return ""
        if not window_text.startswith(prefix_text):  # the new tokens rewrote the window: wait
            return ""
        delta = window_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The rest of the full decode after what was emitted (the held-back tail, if any)."""
        full = self._decode(self.tokens)
        if full.startswith(self.text) and len(full) > len(self.text):
            delta = full[len(self.text) :]
            self.text = full
            return delta
        return ""
