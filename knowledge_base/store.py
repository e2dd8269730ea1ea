"""SQLite, the source of truth of the knowledge base: entries, labelled examples, the embedding
cache, a revision.

The FAISS and BM25 indexes are derived from this database. Every write bumps ``revision`` inside
the same transaction, and each index on disk records the revision it was built from, so a crash
between the database commit and an index write is noticed at the next load (and the index rebuilt
from here, without re-embedding: vectors are cached by content hash).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from knowledge_base.entry import FAQEntry
from knowledge_base.errors import NotFoundError, SupportBotError
from knowledge_base.examples import LabelledExample
from knowledge_base.private import private_file

__all__ = ["EntryStore", "UpsertReport"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    question TEXT NOT NULL,
    alt_questions TEXT NOT NULL DEFAULT '[]',
    answer TEXT NOT NULL,
    category TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    enabled INTEGER NOT NULL DEFAULT 1,
    source TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_category ON entries(category);
CREATE TABLE IF NOT EXISTS embedding_cache (
    model TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, text_hash)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Entries held for review by knowledge_base.content_check: 'held' ones are never served; 'approved'
-- remembers which content an operator cleared, so re-uploading it is not held again.
CREATE TABLE IF NOT EXISTS content_holds (
    entry_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('held', 'approved')),
    updated_at TEXT NOT NULL
);
INSERT OR IGNORE INTO meta(key, value) VALUES ('revision', '0');
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    query TEXT NOT NULL,
    entry_id TEXT NOT NULL,
    source TEXT NOT NULL,
    positive INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    conversation_id TEXT,
    message_id INTEGER
);
CREATE INDEX IF NOT EXISTS examples_entry ON examples(entry_id);
CREATE INDEX IF NOT EXISTS examples_message ON examples(message_id);
"""
# Version 2 added the examples table. Every statement above is IF NOT EXISTS, so opening a version-1
# data folder migrates it in place (the new table starts empty; nothing else changes).
SCHEMA_VERSION = 2


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class UpsertReport:
    added: list[str]
    updated: list[str]
    unchanged: list[str]
    held: dict[str, str] = field(default_factory=dict)
    """Added or updated entries held for review: id -> reason."""

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "updated": len(self.updated), "unchanged": len(self.unchanged)}


class EntryStore:
    """Entries and cached vectors in one SQLite file (WAL; safe to use from many threads)."""

    def __init__(self, path: Path) -> None:
        private_file(path)  # 0600 before SQLite opens it: its -wal and -shm files copy the mode
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:  # refused, not damaged
                self._conn.close()
                raise SupportBotError(
                    f"{path} was written by a newer SupportBot (schema {version}, this one knows {SCHEMA_VERSION})",
                    fix="upgrade SupportBot, or point data_dir at another folder",
                )
            self._conn.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- revision -------------------------------------------------------------------------------
    @property
    def revision(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        return int(row[0])

    @staticmethod
    def _bump(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='revision'")

    # -- entries --------------------------------------------------------------------------------
    @staticmethod
    def _row_to_entry(row: sqlite3.Row | tuple) -> FAQEntry:
        (id_, question, alts, answer, category, tags, enabled, source, created, updated, _hash, hits) = row
        return FAQEntry(
            id=id_,
            question=question,
            alt_questions=tuple(json.loads(alts)),
            answer=answer,
            category=category,
            tags=tuple(json.loads(tags)),
            enabled=bool(enabled),
            source=source,
            created_at=created,
            updated_at=updated,
            hits=hits,
        )

    _COLUMNS = "id, question, alt_questions, answer, category, tags, enabled, source, created_at, updated_at, content_hash, hits"

    def get(self, entry_id: str) -> FAQEntry:
        found = self.get_many([entry_id])
        if not found:
            raise NotFoundError(f"no FAQ entry with id {entry_id!r}", fix="list the ids with `supportbot kb list`")
        return found[0]

    def get_many(self, entry_ids: Sequence[str]) -> list[FAQEntry]:
        """Entries in the order of ``entry_ids`` (missing ids are left out)."""
        if not entry_ids:
            return []
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {self._COLUMNS} FROM entries WHERE id IN ({','.join('?' * len(entry_ids))})",
                list(entry_ids),
            ).fetchall()
        by_id = {row[0]: self._row_to_entry(row) for row in rows}
        return [by_id[i] for i in entry_ids if i in by_id]

    def all(self, *, enabled_only: bool = False, category: str | None = None) -> list[FAQEntry]:
        sql = f"SELECT {self._COLUMNS} FROM entries"
        where, params = [], []
        if enabled_only:  # what may be served: enabled and not held for review
            where.append("enabled = 1 AND id NOT IN (SELECT entry_id FROM content_holds WHERE status = 'held')")
        if category:
            where.append("category = ?")
            params.append(category)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", params).fetchall()
        return [self._row_to_entry(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def categories(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT category, COUNT(*) FROM entries GROUP BY category ORDER BY category")
            return {c: n for c, n in rows.fetchall()}

    def upsert(
        self, entries: Iterable[FAQEntry], *, source: str | None = None, holds: Mapping[str, str] | None = None
    ) -> UpsertReport:
        """Insert new entries, update changed ones in place, leave identical ones alone (one transaction).

        ``holds`` (id -> reason): added or updated entries to hold for review, in the same
        transaction; other added or updated entries lose an earlier hold (their text changed)."""
        added, updated, unchanged = [], [], []
        held: dict[str, str] = {}
        now = _now()
        with self.transaction() as conn:
            for entry in entries:
                row = conn.execute("SELECT content_hash, created_at FROM entries WHERE id = ?", (entry.id,)).fetchone()
                digest = entry.content_hash
                if row and row[0] == digest:
                    unchanged.append(entry.id)
                    continue
                values = (
                    entry.question,
                    json.dumps(list(entry.alt_questions), ensure_ascii=False),
                    entry.answer,
                    entry.category,
                    json.dumps(list(entry.tags), ensure_ascii=False),
                    int(entry.enabled),
                    source if source is not None else entry.source,
                    now,
                    digest,
                )
                if row:
                    conn.execute(
                        "UPDATE entries SET question=?, alt_questions=?, answer=?, category=?, tags=?, enabled=?, "
                        "source=?, updated_at=?, content_hash=? WHERE id=?",
                        (*values, entry.id),
                    )
                    updated.append(entry.id)
                else:
                    conn.execute(
                        "INSERT INTO entries (question, alt_questions, answer, category, tags, enabled, source, "
                        "updated_at, content_hash, id, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (*values, entry.id, entry.created_at or now),
                    )
                    added.append(entry.id)
                if holds is not None:
                    if entry.id in holds:
                        held[entry.id] = holds[entry.id]
                        conn.execute(
                            "INSERT OR REPLACE INTO content_holds VALUES (?, ?, ?, 'held', ?)",
                            (entry.id, holds[entry.id], digest, now),
                        )
                    else:
                        conn.execute("DELETE FROM content_holds WHERE entry_id = ? AND status = 'held'", (entry.id,))
            if added or updated:
                self._bump(conn)
        return UpsertReport(added, updated, unchanged, held)

    # -- review holds ---------------------------------------------------------------------------
    def held(self) -> dict[str, str]:
        """Entries held for review: id -> reason."""
        with self._lock:
            rows = self._conn.execute("SELECT entry_id, reason FROM content_holds WHERE status = 'held' ORDER BY 1")
            return dict(rows.fetchall())

    def approved_hashes(self) -> dict[str, str]:
        """id -> the content hash an operator approved."""
        with self._lock:
            rows = self._conn.execute("SELECT entry_id, content_hash FROM content_holds WHERE status = 'approved'")
            return dict(rows.fetchall())

    def approve(self, entry_ids: Sequence[str]) -> list[str]:
        """Release held entries; returns the ids that were held."""
        held = self.held()
        ids = [i for i in dict.fromkeys(entry_ids) if i in held]
        if ids:
            with self.transaction() as conn:
                conn.executemany(
                    "UPDATE content_holds SET status = 'approved', updated_at = ? WHERE entry_id = ?",
                    [(_now(), i) for i in ids],
                )
                self._bump(conn)
        return ids

    def delete(self, entry_ids: Sequence[str]) -> list[str]:
        """Delete entries; returns the ids that existed."""
        existing = [e.id for e in self.get_many(entry_ids)]
        if existing:
            with self.transaction() as conn:
                conn.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in existing])
                conn.executemany("DELETE FROM content_holds WHERE entry_id = ?", [(i,) for i in existing])
                # An entry's labelled examples go with it: they would teach the retriever an answer
                # that no longer exists (and a later entry with the same id may mean something else).
                conn.executemany("DELETE FROM examples WHERE entry_id = ?", [(i,) for i in existing])
                self._bump(conn)
        return existing

    def record_hits(self, entry_ids: Sequence[str]) -> None:
        """Count how often entries are served (shown in the console); not a content change."""
        if entry_ids:
            with self._lock:
                self._conn.executemany("UPDATE entries SET hits = hits + 1 WHERE id = ?", [(i,) for i in entry_ids])

    # -- embedding cache ------------------------------------------------------------------------
    def cached_vectors(self, model: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(hashes), 500):
                chunk = list(hashes[start : start + 500])
                rows = self._conn.execute(
                    f"SELECT text_hash, vector FROM embedding_cache WHERE model = ? AND text_hash IN "
                    f"({','.join('?' * len(chunk))})",
                    [model, *chunk],
                ).fetchall()
                out.update({h: np.frombuffer(v, dtype=np.float32) for h, v in rows})
        return out

    def cache_vectors(self, model: str, vectors: dict[str, np.ndarray]) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO embedding_cache(model, text_hash, vector) VALUES (?,?,?)",
                # A generator, not a list: 200,000 vectors as bytes at once would be 300 MB more.
                ((model, h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in vectors.items()),
            )

    def prune_cache(self, model: str, keep: set[str]) -> int:
        """Drop cached vectors no entry uses any more (after deletes and edits)."""
        with self._lock:
            hashes = [r[0] for r in self._conn.execute("SELECT text_hash FROM embedding_cache WHERE model=?", (model,))]
        stale = [h for h in hashes if h not in keep]
        if stale:
            with self.transaction() as conn:
                conn.executemany(
                    "DELETE FROM embedding_cache WHERE model=? AND text_hash=?", [(model, h) for h in stale]
                )
        return len(stale)

    # -- labelled examples ----------------------------------------------------------------------
    _EXAMPLE_COLUMNS = "id, query, entry_id, source, positive, created_at, conversation_id, message_id"

    @staticmethod
    def _row_to_example(row: tuple) -> LabelledExample:
        id_, query, entry_id, source, positive, created, conversation_id, message_id = row
        return LabelledExample(
            id=id_,
            query=query,
            entry_id=entry_id,
            source=source,
            positive=bool(positive),
            created_at=created,
            conversation_id=conversation_id,
            message_id=message_id,
        )

    def add_examples(
        self, rows: Sequence[tuple[str, str, str, bool, float, str | None, int | None]]
    ) -> list[LabelledExample]:
        """Store ``(query, entry_id, source, positive, created_at, conversation_id, message_id)``
        rows in one transaction (the revision moves: learned phrasings are part of the index)."""
        out = []
        with self.transaction() as conn:
            for row in rows:
                cur = conn.execute(
                    "INSERT INTO examples (query, entry_id, source, positive, created_at, conversation_id, "
                    "message_id) VALUES (?,?,?,?,?,?,?)",
                    (row[0], row[1], row[2], int(row[3]), row[4], row[5], row[6]),
                )
                out.append(LabelledExample(int(cur.lastrowid or 0), *row))
            if out:
                self._bump(conn)
        return out

    def examples(
        self,
        *,
        entry_id: str | None = None,
        source: str | None = None,
        text: str | None = None,
        positive: bool | None = None,
        conversation_id: str | None = None,
        message_id: int | None = None,
        limit: int | None = None,
    ) -> list[LabelledExample]:
        """Examples matching every filter given (``text``: a substring of the query, any case),
        newest first."""
        where, params = [], []
        for column, value in (
            ("entry_id", entry_id),
            ("source", source),
            ("conversation_id", conversation_id),
            ("message_id", message_id),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if positive is not None:
            where.append("positive = ?")
            params.append(int(positive))
        if text:
            where.append("instr(lower(query), lower(?)) > 0")
            params.append(text)
        sql = f"SELECT {self._EXAMPLE_COLUMNS} FROM examples"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            return [self._row_to_example(r) for r in self._conn.execute(sql, params).fetchall()]

    def positive_queries(self, entry_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Per entry, the queries of its positive examples, newest first (all entries without ids)."""
        sql = "SELECT entry_id, query FROM examples WHERE positive = 1 ORDER BY created_at DESC, id DESC"
        with self._lock:
            if entry_ids is not None and len(entry_ids) <= 500:
                marks = ",".join("?" * len(entry_ids))
                sql = sql.replace("ORDER BY", f"AND entry_id IN ({marks}) ORDER BY")
                rows = self._conn.execute(sql, list(entry_ids)).fetchall() if entry_ids else []
            else:  # a re-index of many entries: one pass over the table (examples are far fewer than entries)
                rows = self._conn.execute(sql).fetchall()
        wanted = None if entry_ids is None else set(entry_ids)
        out: dict[str, list[str]] = {}
        for entry_id, query in rows:
            if wanted is None or entry_id in wanted:
                out.setdefault(entry_id, []).append(query)
        return out

    def delete_examples(self, example_ids: Sequence[int]) -> list[LabelledExample]:
        """Delete examples by id (one transaction); returns those that existed."""
        if not example_ids:
            return []
        found = []
        with self.transaction() as conn:
            for start in range(0, len(example_ids), 500):
                chunk = [int(i) for i in example_ids[start : start + 500]]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT {self._EXAMPLE_COLUMNS} FROM examples WHERE id IN ({marks})", chunk)
                found += [self._row_to_example(r) for r in rows.fetchall()]
                conn.execute(f"DELETE FROM examples WHERE id IN ({marks})", chunk)
            if found:
                self._bump(conn)
        return found

    def example_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT source, positive, COUNT(*) FROM examples GROUP BY source, positive")
            counts = {"examples": 0, "positive": 0, "negative": 0}
            for source, positive, n in rows.fetchall():
                counts["examples"] += n
                counts["positive" if positive else "negative"] += n
                counts[f"source:{source}"] = counts.get(f"source:{source}", 0) + n
        return counts
