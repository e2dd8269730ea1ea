"""The conversation store: every question, answer, citation, latency, rating and correction, in SQLite.

It is the support team's memory: the audit trail of each answer (mode, cited FAQ entries and their
scores, latency, model and adapter, the resolved question), the unanswered queue, thumbs up/down,
operator corrections, the analytics behind the insights page, and the fine-tuning pairs.

>>> store = ConversationStore(data_dir / "conversations.sqlite3")          # doctest: +SKIP
>>> cid = store.create_conversation(channel="api")                           # doctest: +SKIP
>>> store.add_message(cid, "user", "Where is my order? Mail me at jo@example.com")  # doctest: +SKIP
1
>>> store.get_message(1).text                                                # doctest: +SKIP
'Where is my order? Mail me at [email]'

Guarantees:

* **No raw personal data.** With ``redact_pii`` (the default) message texts, resolved questions,
  feedback comments, queue questions and corrections pass through :func:`chatbot.redact.redact`
  before they reach the database. ``redact_keep`` lists the business's own contact details, which
  answers quote and training data needs.
* **Many threads, many processes.** Each thread gets its own connection (closed when the thread
  ends or at :meth:`ConversationStore.close`); the database is in WAL mode so readers never block the
  writer; writes take the write lock up front (``BEGIN IMMEDIATE``) and wait up to
  ``busy_timeout_s`` for it, so concurrent writers queue instead of failing with "database is
  locked". Every multi-statement write is one transaction.
* **Schema upgrades in place.** ``PRAGMA user_version`` holds the schema version; at open the
  missing steps of :data:`MIGRATIONS` run in one transaction. Migrations are append-only: never edit
  a released step, add a new one. A database newer than this code is refused, not damaged.
* **A conversation belongs to the client that started it.** A public client (a chat page's
  browser, an API client) creates it with a secret token; only the token's SHA-256 is stored
  (``owner_hash``), and :meth:`ConversationStore.owns` / :meth:`ConversationStore.owns_answer` check
  it. Conversations from before schema 3 have no owner: no public client can continue or rate them.
* **Private on disk.** The database is created 0600 (SQLite gives ``-wal``/``-shm`` the same mode).

Times are ISO-8601 UTC strings (``2026-11-23T14:05:09.123456+00:00``), so they sort as text and
``created_at[:10]`` is the UTC day.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import json
import math
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

from chatbot.redact import redact
from knowledge_base.atomic import atomic_path
from knowledge_base.errors import NotFoundError, SupportBotError
from knowledge_base.export import spreadsheet_safe
from knowledge_base.private import private_file

__all__ = [
    "CSV_COLUMNS",
    "MIGRATIONS",
    "MODES",
    "SCHEMA_VERSION",
    "ConversationStore",
    "StoredMessage",
    "TrainingPair",
    "UnansweredQuestion",
]

#: How an assistant message was produced (see the answer policy in DESIGN.md).
MODES = ("faq", "clarify", "generated", "handoff")
ROLES = ("user", "assistant")
RATINGS = ("up", "down")
UNANSWERED_STATUSES = ("open", "resolved", "dismissed")

#: Schema steps; step ``n`` (1-based) takes a database from ``user_version`` n-1 to n. Append only.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: conversations, messages with their citations, feedback, the unanswered queue
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            client TEXT NOT NULL DEFAULT '',
            channel TEXT NOT NULL DEFAULT 'web'
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            text TEXT NOT NULL,
            created_at TEXT NOT NULL,
            mode TEXT,
            sources TEXT NOT NULL DEFAULT '[]',
            scores TEXT NOT NULL DEFAULT '[]',
            latency_ms REAL
        )""",
        "CREATE INDEX messages_by_conversation ON messages (conversation_id, id)",
        "CREATE INDEX messages_by_time ON messages (created_at)",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id INTEGER NOT NULL UNIQUE REFERENCES messages (id) ON DELETE CASCADE,
            rating TEXT NOT NULL CHECK (rating IN ('up', 'down')),
            comment TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE unanswered (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            question TEXT NOT NULL,
            created_at TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'open',
            reason TEXT NOT NULL,
            top_score REAL,
            conversation_id TEXT,
            message_id INTEGER
        )""",
    ),
    (  # 2: the audit trail of an answer, the FAQ entry that closed a queue item, operator corrections
        "ALTER TABLE messages ADD COLUMN model TEXT",
        "ALTER TABLE messages ADD COLUMN adapter TEXT",
        "ALTER TABLE messages ADD COLUMN question TEXT",
        "ALTER TABLE unanswered ADD COLUMN resolved_entry_id TEXT",
        "ALTER TABLE unanswered ADD COLUMN updated_at TEXT",
        "CREATE INDEX unanswered_by_status ON unanswered (status, id)",
        "CREATE INDEX unanswered_by_message ON unanswered (message_id)",
        """CREATE TABLE corrections (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            answer TEXT NOT NULL,
            editor TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX corrections_by_message ON corrections (message_id, id)",
    ),
    (  # 3: the client a conversation belongs to: the SHA-256 of its secret token (NULL: no public client)
        "ALTER TABLE conversations ADD COLUMN owner_hash TEXT",
    ),
    (  # 4: hand-off tickets, the operators' replies, the notification outbox (`chatbot.tickets`)
        """CREATE TABLE tickets (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            message_id INTEGER,
            question TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'answered', 'closed')),
            contact TEXT,
            contact_kind TEXT,
            contact_expires_at TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX tickets_by_status ON tickets (status, id)",
        "CREATE INDEX tickets_by_conversation ON tickets (conversation_id, id)",
        """CREATE TABLE ticket_replies (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ticket_id INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
            conversation_id TEXT NOT NULL,
            text TEXT NOT NULL,
            operator TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX replies_by_conversation ON ticket_replies (conversation_id, id)",
        """CREATE TABLE notifications (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ticket_id INTEGER,
            channel TEXT NOT NULL,
            payload TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT NOT NULL,
            last_error TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            sent_at TEXT
        )""",
        "CREATE INDEX notifications_due ON notifications (status, next_attempt_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

#: Columns of :meth:`ConversationStore.export_csv`, in order.
CSV_COLUMNS = (
    "message_id",
    "conversation_id",
    "channel",
    "created_at",
    "role",
    "text",
    "question",
    "mode",
    "sources",
    "scores",
    "latency_ms",
    "model",
    "adapter",
    "feedback",
    "feedback_comment",
    "corrected_answer",
)

# The user question an assistant message answered, when it was stored without `question`: the
# customer message right before it in the same conversation.
_QUESTION_SQL = """COALESCE(m.question, (
    SELECT u.text FROM messages u
    WHERE u.conversation_id = m.conversation_id AND u.role = 'user' AND u.id < m.id
    ORDER BY u.id DESC LIMIT 1))"""
_CORRECTION_SQL = "(SELECT c.answer FROM corrections c WHERE c.message_id = m.id ORDER BY c.id DESC LIMIT 1)"
_MESSAGE_COLUMNS = (
    "id, conversation_id, role, text, created_at, mode, sources, scores, latency_ms, model, adapter, question"
)
_ID_CHUNK = 500  # below SQLite's bound-parameter limit, old builds included


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: str
    role: str
    """``"user"`` or ``"assistant"``."""
    text: str
    created_at: str
    """ISO-8601 UTC."""
    mode: str | None = None
    """For assistant messages: ``"faq"``, ``"clarify"``, ``"generated"`` or ``"handoff"``."""
    sources: list[str] = field(default_factory=list)
    """Cited FAQ entry ids, best first."""
    scores: list[float] = field(default_factory=list)
    latency_ms: float | None = None
    model: str | None = None
    adapter: str | None = None
    question: str | None = None
    """For assistant messages: the (resolved) question it answered."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UnansweredQuestion:
    id: int
    question: str
    created_at: str
    status: str
    """``"open"``, ``"resolved"`` or ``"dismissed"``."""
    reason: str
    """Why it is here, e.g. ``"handoff"`` or ``"thumbs_down"``."""
    top_score: float | None
    conversation_id: str | None
    message_id: int | None
    resolved_entry_id: str | None
    """The FAQ entry that answers it now, once resolved."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingPair:
    question: str
    answer: str
    sources: list[str]
    origin: str
    """``"thumbs_up"`` (the bot's answer, approved by the customer) or ``"correction"`` (an operator's)."""
    message_id: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Connection:
    """One thread's connection. Closed when its thread ends (the thread-local slot holding it is
    freed, and this object with it) or when the store closes, whichever comes first."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); ``values`` sorted."""
    if not values:
        return None
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def owner_hash(owner: str) -> str:
    """What the store keeps of a client token: its SHA-256 (the tokens are 256 random bits, so a
    slow hash would add nothing)."""
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()


def _same_hash(owner: str, stored: str | None) -> bool:
    # Hash and compare even when there is nothing stored, so an unknown id costs the same time.
    candidate = owner_hash(owner or "").encode("ascii")
    return hmac.compare_digest(candidate, (stored or "").encode("ascii")) and stored is not None and bool(owner)


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    unique = sorted({int(i) for i in ids})
    for start in range(0, len(unique), _ID_CHUNK):
        yield unique[start : start + _ID_CHUNK]


class ConversationStore:
    """Conversations, answers and the support team's feedback loop, in one SQLite file.

    ``path``: the database file (the app uses ``<data_dir>/conversations.sqlite3``); its folder is
    created. ``redact_pii``: mask e-mails, phones, cards and IBANs before storing anything.
    ``redact_keep``: strings never masked (your own support address and hotline). ``clock``: returns
    the current time (tests pass a fixed one). ``busy_timeout_s``: how long a writer waits for another.
    """

    def __init__(
        self,
        path: Path,
        *,
        redact_pii: bool = True,
        redact_keep: Sequence[str] = (),
        clock: Callable[[], datetime] | None = None,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.redact_pii = redact_pii
        self._keep = tuple(redact_keep)
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        private_file(self.path)  # 0600 before SQLite opens it: its -wal and -shm files copy the mode
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise SupportBotError(
                f"{self.path} is not a usable SupportBot conversation database ({exc})",
                fix="move the file away (SupportBot creates a fresh one) or restore it from a backup",
            ) from exc
        except BaseException:
            self.close()
            raise

    # -- plumbing -------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        holder: _Connection | None = getattr(self._local, "holder", None)
        if self._closed:
            raise SupportBotError(f"the conversation store {self.path} is closed", fix="open a new ConversationStore")
        if holder is None:
            # check_same_thread=False only so that close() may close it from another thread;
            # it is used by its own thread alone.
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")  # durable across app crashes in WAL mode
            holder = _Connection(conn)
            with self._lock:
                self._open.add(holder)
            self._local.holder = holder
        return holder.conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the write lock is taken at BEGIN, so it never fails half-way."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for several SELECTs (writers carry on meanwhile, WAL)."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _migrate(self) -> None:
        conn = self._conn()
        conn.execute("PRAGMA journal_mode = WAL")
        with self._write():
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SupportBotError(
                    f"{self.path} has conversation schema version {version}; this SupportBot knows "
                    f"versions up to {SCHEMA_VERSION}",
                    fix="upgrade SupportBot, or point --data-dir at another folder",
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")

    def _now(self) -> str:
        return self._clock().astimezone(timezone.utc).isoformat(timespec="microseconds")

    def _today(self) -> date:
        return self._clock().astimezone(timezone.utc).date()

    def _redact(self, text: str) -> str:
        return redact(text, keep=self._keep) if self.redact_pii else text

    def redact(self, text: str) -> str:
        """``text`` as this store would keep it (masked when ``redact_pii``): for data stored
        elsewhere, such as the knowledge base's labelled examples (`chatbot.learning`)."""
        return self._redact(text)

    def _assistant_message(self, conn: sqlite3.Connection, message_id: int, action: str) -> None:
        # SQLite integers are 64-bit: a larger id would raise OverflowError, not "not found".
        in_range = isinstance(message_id, int) and 0 < message_id < 2**63
        row = conn.execute("SELECT role FROM messages WHERE id = ?", (message_id,)).fetchone() if in_range else None
        if row is None:
            raise NotFoundError(
                f"no message with id {message_id}",
                fix="use a message_id returned by the chat API (POST /api/chat) or by add_message()",
            )
        if row["role"] != "assistant":
            raise NotFoundError(
                f"no assistant message with id {message_id}: it is the customer's own message, "
                f"and only answers can get {action}",
                fix="use the message_id of the answer (the chat API returns it with each reply)",
            )

    @staticmethod
    def _message(row: sqlite3.Row) -> StoredMessage:
        return StoredMessage(
            id=row["id"],
            conversation_id=row["conversation_id"],
            role=row["role"],
            text=row["text"],
            created_at=row["created_at"],
            mode=row["mode"],
            sources=json.loads(row["sources"]),
            scores=json.loads(row["scores"]),
            latency_ms=row["latency_ms"],
            model=row["model"],
            adapter=row["adapter"],
            question=row["question"],
        )

    # -- conversations and messages -------------------------------------------------------------

    def create_conversation(self, *, client: str = "", channel: str = "web", owner: str | None = None) -> str:
        """A new conversation; returns its id (uuid4 hex). ``client``: an opaque tag, never a raw IP.
        ``owner``: the secret token of the customer's browser or API client that may continue, read
        and rate it (:meth:`owns`); only its SHA-256 is stored. Without one, no public client can."""
        conversation_id = uuid.uuid4().hex
        with self._write() as conn:
            conn.execute(
                "INSERT INTO conversations (id, created_at, client, channel, owner_hash) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, self._now(), client, channel, None if owner is None else owner_hash(owner)),
            )
        return conversation_id

    def owns(self, owner: str, conversation_id: str) -> bool:
        """True when ``owner`` is the token ``conversation_id`` was created with (constant-time);
        False for an unknown id, a conversation without an owner, or another token alike."""
        row = self._conn().execute("SELECT owner_hash FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        stored = row["owner_hash"] if row is not None else None
        return _same_hash(owner, stored)

    def owns_answer(self, owner: str, message_id: int) -> bool:
        """True when ``message_id`` is an assistant message in a conversation ``owner`` owns."""
        row = (
            self._conn()
            .execute(
                "SELECT c.owner_hash FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.id = ? AND m.role = 'assistant'",
                (int(message_id),),
            )
            .fetchone()
        )
        return _same_hash(owner, row["owner_hash"] if row is not None else None)

    def conversation_exists(self, conversation_id: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return row is not None

    def add_message(
        self,
        conversation_id: str,
        role: str,
        text: str,
        *,
        mode: str | None = None,
        sources: Sequence[str] = (),
        scores: Sequence[float] = (),
        latency_ms: float | None = None,
        model: str | None = None,
        adapter: str | None = None,
        question: str | None = None,
    ) -> int:
        """Store one message; returns its id. ``text`` and ``question`` are redacted when redact_pii."""
        if role not in ROLES:
            raise SupportBotError(f"unknown message role {role!r}", fix="use 'user' or 'assistant'")
        if mode is not None and mode not in MODES:
            raise SupportBotError(f"unknown answer mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
        row = (
            conversation_id,
            role,
            self._redact(text),
            self._now(),
            mode,
            json.dumps([str(s) for s in sources]),
            json.dumps([float(s) for s in scores]),
            None if latency_ms is None else float(latency_ms),
            model,
            adapter,
            None if question is None else self._redact(question),
        )
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise NotFoundError(
                    f"no conversation with id {conversation_id!r}",
                    fix="start one with create_conversation() (the chat API does when conversation_id is left out)",
                )
            cur = conn.execute(
                "INSERT INTO messages (conversation_id, role, text, created_at, mode, sources, scores, "
                "latency_ms, model, adapter, question) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cur.lastrowid or 0)

    def history(self, conversation_id: str, *, limit: int = 20) -> list[StoredMessage]:
        """The last ``limit`` messages of a conversation, oldest first ([] for an unknown one)."""
        rows = (
            self._conn()
            .execute(
                f"SELECT * FROM (SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? "
                "ORDER BY id DESC LIMIT ?) ORDER BY id",
                (conversation_id, max(int(limit), 0)),
            )
            .fetchall()
        )
        return [self._message(r) for r in rows]

    def conversations(self, *, limit: int = 100, text: str = "") -> list[dict[str, Any]]:
        """The latest conversations, newest first: ``id, created_at, channel, messages`` and
        ``first_question`` (its first customer message); ``text`` keeps those with a message
        containing it (any case)."""
        where, params = "", [max(int(limit), 0)]
        if text:
            where = "WHERE c.id IN (SELECT conversation_id FROM messages WHERE instr(lower(text), lower(?)) > 0)"
            params.insert(0, text)  # type: ignore[arg-type]
        rows = (
            self._conn()
            .execute(
                "SELECT c.id, c.created_at, c.channel, "
                "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS messages, "
                "(SELECT u.text FROM messages u WHERE u.conversation_id = c.id AND u.role = 'user' "
                f"ORDER BY u.id LIMIT 1) AS first_question FROM conversations c {where} "
                "ORDER BY c.created_at DESC, c.rowid DESC LIMIT ?",
                params,
            )
            .fetchall()
        )
        return [dict(r) for r in rows]

    def unanswered_items(self, ids: Sequence[int]) -> list[UnansweredQuestion]:
        """Queue items by id (any status), in the order of ``ids``; unknown ids are left out."""
        found: dict[int, UnansweredQuestion] = {}
        for chunk in _chunks(ids):
            rows = (
                self._conn()
                .execute(
                    "SELECT id, question, created_at, status, reason, top_score, conversation_id, message_id, "
                    f"resolved_entry_id FROM unanswered WHERE id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                .fetchall()
            )
            found.update({r["id"]: UnansweredQuestion(**dict(r)) for r in rows})
        return [found[i] for i in ids if i in found]

    def get_message(self, message_id: int) -> StoredMessage:
        row = self._conn().execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise NotFoundError(
                f"no message with id {message_id}",
                fix="use a message_id returned by the chat API (POST /api/chat) or by add_message()",
            )
        return self._message(row)

    # -- feedback and corrections ---------------------------------------------------------------

    def add_feedback(self, message_id: int, rating: str, comment: str = "") -> int:
        """Rate an answer ``"up"`` or ``"down"``; a later rating of the same answer replaces the
        earlier one. Returns the feedback id (the same id when replacing)."""
        if rating not in RATINGS:
            raise SupportBotError(f"unknown rating {rating!r}", fix="use 'up' or 'down'")
        comment = self._redact(comment or "")
        with self._write() as conn:
            self._assistant_message(conn, message_id, "feedback")
            conn.execute(
                "INSERT INTO feedback (message_id, rating, comment, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (message_id) DO UPDATE SET rating = excluded.rating, "
                "comment = excluded.comment, created_at = excluded.created_at",
                (message_id, rating, comment, self._now()),
            )
            return int(conn.execute("SELECT id FROM feedback WHERE message_id = ?", (message_id,)).fetchone()[0])

    def add_correction(self, message_id: int, corrected_answer: str, *, editor: str = "") -> int:
        """An operator's corrected answer for an assistant message; the latest one counts."""
        if not corrected_answer.strip():
            raise SupportBotError(
                f"the correction for message {message_id} is empty",
                fix="write the answer the bot should give",
            )
        answer = self._redact(corrected_answer.strip())
        with self._write() as conn:
            self._assistant_message(conn, message_id, "corrections")
            cur = conn.execute(
                "INSERT INTO corrections (message_id, answer, editor, created_at) VALUES (?, ?, ?, ?)",
                (message_id, answer, editor, self._now()),
            )
            return int(cur.lastrowid or 0)

    def low_rated(self, *, limit: int = 200) -> list[dict[str, Any]]:
        """Thumbs-down answers, most recently rated first, with what the team needs to fix them:
        ``message_id, conversation_id, question, answer, mode, sources, scores, comment, created_at``
        (of the answer), ``rated_at``, and ``correction`` (the latest, or None)."""
        rows = (
            self._conn()
            .execute(
                f"SELECT m.id, m.conversation_id, {_QUESTION_SQL} AS question, m.text, m.mode, m.sources, "
                "m.scores, m.created_at, f.comment, f.created_at AS rated_at, "
                f"{_CORRECTION_SQL} AS correction "
                "FROM feedback f JOIN messages m ON m.id = f.message_id WHERE f.rating = 'down' "
                "ORDER BY f.created_at DESC, f.id DESC LIMIT ?",
                (max(int(limit), 0),),
            )
            .fetchall()
        )
        return [
            {
                "message_id": r["id"],
                "conversation_id": r["conversation_id"],
                "question": r["question"] or "",
                "answer": r["text"],
                "mode": r["mode"],
                "sources": json.loads(r["sources"]),
                "scores": json.loads(r["scores"]),
                "comment": r["comment"],
                "created_at": r["created_at"],
                "rated_at": r["rated_at"],
                "correction": r["correction"],
            }
            for r in rows
        ]

    def training_pairs(self) -> list[TrainingPair]:
        """Question/answer pairs worth fine-tuning on, oldest first.

        * an operator correction, whatever the bot did (even a handoff): the latest correction is the
          answer, origin ``"correction"``;
        * otherwise a thumbs-up answer given from the FAQ or generated from it (mode ``faq`` or
          ``generated``), origin ``"thumbs_up"``.

        Never: handoffs or clarifying questions without a correction, thumbs-down answers without a
        correction, answers whose question is unknown.
        """
        rows = (
            self._conn()
            .execute(
                f"SELECT m.id, m.text, m.sources, {_QUESTION_SQL} AS question, "
                f"{_CORRECTION_SQL} AS correction "
                "FROM messages m LEFT JOIN feedback f ON f.message_id = m.id "
                "WHERE m.role = 'assistant' AND ("
                "  EXISTS (SELECT 1 FROM corrections c WHERE c.message_id = m.id)"
                "  OR (f.rating = 'up' AND m.mode IN ('faq', 'generated'))) "
                "ORDER BY m.id"
            )
            .fetchall()
        )
        pairs = []
        for r in rows:
            question = (r["question"] or "").strip()
            if not question:
                continue
            corrected = r["correction"] is not None
            pairs.append(
                TrainingPair(
                    question=question,
                    answer=r["correction"] if corrected else r["text"],
                    sources=json.loads(r["sources"]),
                    origin="correction" if corrected else "thumbs_up",
                    message_id=r["id"],
                )
            )
        return pairs

    # -- the unanswered queue -------------------------------------------------------------------

    def add_unanswered(
        self,
        question: str,
        *,
        conversation_id: str | None,
        message_id: int | None,
        top_score: float | None,
        reason: str,
    ) -> int:
        """Queue a question the bot could not answer well; returns its id.

        Idempotent per answer: while an item for the same ``message_id`` and ``reason`` is open, its id
        is returned instead of adding a twin (a customer clicking thumbs-down twice).
        """
        if not reason:
            raise SupportBotError("an unanswered question needs a reason", fix="e.g. 'handoff' or 'thumbs_down'")
        question = self._redact(question)
        with self._write() as conn:
            if message_id is not None:
                row = conn.execute(
                    "SELECT id FROM unanswered WHERE message_id = ? AND reason = ? AND status = 'open'",
                    (message_id, reason),
                ).fetchone()
                if row is not None:
                    return int(row["id"])
            now = self._now()
            cur = conn.execute(
                "INSERT INTO unanswered (question, created_at, updated_at, status, reason, top_score, "
                "conversation_id, message_id) VALUES (?, ?, ?, 'open', ?, ?, ?, ?)",
                (question, now, now, reason, top_score, conversation_id, message_id),
            )
            return int(cur.lastrowid or 0)

    def unanswered(self, *, status: str = "open", limit: int = 1000) -> list[UnansweredQuestion]:
        """Queue items with ``status`` (``"open"``, ``"resolved"``, ``"dismissed"`` or ``"all"``),
        newest first."""
        if status != "all" and status not in UNANSWERED_STATUSES:
            raise SupportBotError(
                f"unknown queue status {status!r}",
                fix=f"use one of {', '.join(UNANSWERED_STATUSES)} or 'all'",
            )
        where = "" if status == "all" else "WHERE status = ?"
        params: tuple[Any, ...] = () if status == "all" else (status,)
        rows = (
            self._conn()
            .execute(
                "SELECT id, question, created_at, status, reason, top_score, conversation_id, message_id, "
                f"resolved_entry_id FROM unanswered {where} ORDER BY id DESC LIMIT ?",
                (*params, max(int(limit), 0)),
            )
            .fetchall()
        )
        return [UnansweredQuestion(**dict(r)) for r in rows]

    def resolve_unanswered(self, ids: Sequence[int], entry_id: str) -> int:
        """Mark queue items resolved by FAQ entry ``entry_id``; returns how many ids exist."""
        if not entry_id:
            raise SupportBotError(
                "resolving needs the id of the FAQ entry that answers the question",
                fix="add or edit the entry first, then pass its id",
            )
        return self._set_status(ids, "resolved", entry_id)

    def dismiss_unanswered(self, ids: Sequence[int]) -> int:
        """Take queue items off the open list without an answer (spam, off-topic); returns the count."""
        return self._set_status(ids, "dismissed", None)

    def _set_status(self, ids: Sequence[int], status: str, entry_id: str | None) -> int:
        changed = 0
        with self._write() as conn:
            now = self._now()
            for chunk in _chunks(ids):
                cur = conn.execute(
                    "UPDATE unanswered SET status = ?, resolved_entry_id = ?, updated_at = ? "
                    f"WHERE id IN ({', '.join('?' * len(chunk))})",
                    (status, entry_id, now, *chunk),
                )
                changed += cur.rowcount
        return changed

    # -- analytics and export -------------------------------------------------------------------

    def stats(self, *, days: int = 30, top_entries: int = 10) -> dict[str, Any]:
        """Activity of the last ``days`` UTC days, today included.

        A "question" is an assistant answer (each answers one customer turn). Returns::

            {"since": "YYYY-MM-DD", "until": "YYYY-MM-DD",
             "per_day": [{"date", "questions", "by_mode": {mode: n}, "handoff_rate",
                          "latency_p50_ms", "latency_p95_ms"}, ...],   # every day, oldest first
             "totals": {same fields but date, plus "conversations"},
             "most_hit_entries": [(entry_id, n), ...],  # sources[0] of faq/generated answers
             "feedback": {"up": n, "down": n},          # ratings given in the window
             "unanswered_open": n}                       # the queue now

        Rates and percentiles are None where there is nothing to measure; percentiles interpolate
        linearly between ranks.
        """
        days = max(int(days), 1)
        until = self._today()
        since = until - timedelta(days=days - 1)
        start = since.isoformat()
        with self._read() as conn:
            counts = conn.execute(
                "SELECT substr(created_at, 1, 10) AS day, mode, COUNT(*) AS n FROM messages "
                "WHERE role = 'assistant' AND created_at >= ? GROUP BY day, mode",
                (start,),
            ).fetchall()
            latencies = conn.execute(
                "SELECT substr(created_at, 1, 10) AS day, latency_ms FROM messages "
                "WHERE role = 'assistant' AND created_at >= ? AND latency_ms IS NOT NULL",
                (start,),
            ).fetchall()
            hits = conn.execute(
                "SELECT json_extract(sources, '$[0]') AS entry, COUNT(*) AS n FROM messages "
                "WHERE role = 'assistant' AND mode IN ('faq', 'generated') AND created_at >= ? "
                "AND json_array_length(sources) > 0 GROUP BY entry ORDER BY n DESC, entry LIMIT ?",
                (start, max(int(top_entries), 0)),
            ).fetchall()
            ratings = conn.execute(
                "SELECT rating, COUNT(*) AS n FROM feedback WHERE created_at >= ? GROUP BY rating", (start,)
            ).fetchall()
            conversations = conn.execute(
                "SELECT COUNT(*) FROM conversations WHERE created_at >= ?", (start,)
            ).fetchone()[0]
            open_items = conn.execute("SELECT COUNT(*) FROM unanswered WHERE status = 'open'").fetchone()[0]

        day_names = [(since + timedelta(days=i)).isoformat() for i in range(days)]
        by_day: dict[str, dict[str, int]] = {d: {} for d in day_names}
        lat_by_day: dict[str, list[float]] = {d: [] for d in day_names}
        for r in counts:
            if r["day"] in by_day:  # rows stamped in the future (clock skew) are left out
                by_day[r["day"]][r["mode"]] = r["n"]
        for r in latencies:
            if r["day"] in lat_by_day:
                lat_by_day[r["day"]].append(float(r["latency_ms"]))

        def summary(modes: dict[str, int], lat: list[float]) -> dict[str, Any]:
            questions = sum(modes.values())
            lat = sorted(lat)
            return {
                "questions": questions,
                "by_mode": {m: modes.get(m, 0) for m in MODES},
                "handoff_rate": modes.get("handoff", 0) / questions if questions else None,
                "latency_p50_ms": _percentile(lat, 50),
                "latency_p95_ms": _percentile(lat, 95),
            }

        total_modes: dict[str, int] = {}
        for modes in by_day.values():
            for mode, n in modes.items():
                total_modes[mode] = total_modes.get(mode, 0) + n
        totals = summary(total_modes, [x for lat in lat_by_day.values() for x in lat])
        totals["conversations"] = conversations
        return {
            "since": since.isoformat(),
            "until": until.isoformat(),
            "per_day": [{"date": d, **summary(by_day[d], lat_by_day[d])} for d in day_names],
            "totals": totals,
            "most_hit_entries": [(r["entry"], r["n"]) for r in hits],
            "feedback": {rating: 0 for rating in RATINGS} | {r["rating"]: r["n"] for r in ratings},
            "unanswered_open": open_items,
        }

    def export_csv(self, path_or_file: Path | str | IO[str], *, excel_safe: bool = True) -> int:
        """Every message, oldest first, with its conversation, audit trail, feedback and latest
        correction (columns: :data:`CSV_COLUMNS`; ``sources`` and ``scores`` as JSON lists). Returns
        the number of rows written, header excluded.

        Given a path, the file is replaced atomically (never half-written); given an open text file,
        rows are written to it. ``excel_safe`` prefixes every text cell that starts like a spreadsheet
        formula (``=``, ``+``, ``-``, ``@``, tab, CR) with ``'`` (:func:`spreadsheet_safe`): customers
        type those cells, and a formula in a log opened in Excel is a known attack (CSV injection).
        """
        if isinstance(path_or_file, (str, Path)):
            with atomic_path(Path(path_or_file)) as tmp, tmp.open("w", encoding="utf-8", newline="") as fh:
                return self._write_csv(fh, excel_safe)
        return self._write_csv(path_or_file, excel_safe)

    def _write_csv(self, fh: IO[str], excel_safe: bool) -> int:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        written = 0
        with self._read() as conn:
            cursor = conn.execute(
                "SELECT m.id AS message_id, m.conversation_id, c.channel, m.created_at, m.role, m.text, "
                "m.question, m.mode, m.sources, m.scores, m.latency_ms, m.model, m.adapter, "
                "f.rating AS feedback, f.comment AS feedback_comment, "
                f"{_CORRECTION_SQL} AS corrected_answer "
                "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "LEFT JOIN feedback f ON f.message_id = m.id ORDER BY m.id"
            )
            for row in cursor:
                record = dict(row)
                if excel_safe:
                    record = {k: spreadsheet_safe(v) if isinstance(v, str) else v for k, v in record.items()}
                writer.writerow(["" if record[k] is None else record[k] for k in CSV_COLUMNS])
                written += 1
        return written

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connection; later calls raise. Safe to call twice."""
        with self._lock:
            self._closed = True
            holders = list(self._open)
            self._open = weakref.WeakSet()
        for holder in holders:
            with contextlib.suppress(Exception):
                holder.conn.close()
        self._local = threading.local()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
