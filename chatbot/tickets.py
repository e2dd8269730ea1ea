"""Hand-off tickets, the operators' replies and the notification outbox, in the conversation store.

The tables come with the store's schema (migration 3 in `chatbot.store`); this module holds their
queries so that the store module stays about conversations. The workflow around them (validation,
business hours, notifications, retention) is `chatbot.handoff`'s.

A ticket's ``contact`` is the one piece of personal data kept unredacted: the customer gave it to
be answered, it is shown only in the console's hand-off queue, and it is erased after
``handoff.contact_retention_days`` (:meth:`Tickets.erase_expired_contacts`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from chatbot.store import ConversationStore
from knowledge_base.errors import NotFoundError, SupportBotError

__all__ = ["NOTIFICATION_CHANNELS", "TICKET_STATUSES", "Notification", "Reply", "Ticket", "Tickets"]

TICKET_STATUSES = ("open", "answered", "closed")
NOTIFICATION_CHANNELS = ("webhook", "email")


@dataclass(frozen=True)
class Ticket:
    id: int
    conversation_id: str
    message_id: int | None
    question: str
    status: str
    contact: str | None
    contact_kind: str | None
    created_at: str
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Reply:
    id: int
    ticket_id: int
    conversation_id: str
    text: str
    operator: str
    created_at: str


@dataclass(frozen=True)
class Notification:
    id: int
    ticket_id: int | None
    channel: str
    payload: dict[str, Any]
    status: str
    attempts: int
    next_attempt_at: str
    last_error: str
    sent_at: str | None


def _ticket(row: sqlite3.Row) -> Ticket:
    return Ticket(
        id=row["id"],
        conversation_id=row["conversation_id"],
        message_id=row["message_id"],
        question=row["question"],
        status=row["status"],
        contact=row["contact"],
        contact_kind=row["contact_kind"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _notification(row: sqlite3.Row) -> Notification:
    return Notification(
        id=row["id"],
        ticket_id=row["ticket_id"],
        channel=row["channel"],
        payload=json.loads(row["payload"]),
        status=row["status"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        sent_at=row["sent_at"],
    )


class Tickets:
    """The ticket tables of one :class:`ConversationStore` (its connections and transactions)."""

    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    # -- tickets ---------------------------------------------------------------------------------
    def open(self, conversation_id: str, message_id: int | None, question: str) -> tuple[Ticket, bool]:
        """The conversation's unclosed ticket, or a new open one; ``(ticket, created)``."""
        now = self.store._now()
        with self.store._write() as conn:
            row = conn.execute(
                "SELECT * FROM tickets WHERE conversation_id = ? AND status != 'closed' ORDER BY id DESC LIMIT 1",
                (conversation_id,),
            ).fetchone()
            if row is not None:
                conn.execute("UPDATE tickets SET status = 'open', updated_at = ? WHERE id = ?", (now, row["id"]))
                ticket_id, created = int(row["id"]), False
            else:
                cursor = conn.execute(
                    "INSERT INTO tickets (conversation_id, message_id, question, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (conversation_id, message_id, self.store.redact(question), now, now),
                )
                ticket_id, created = int(cursor.lastrowid or 0), True
        return self.get(ticket_id), created

    def get(self, ticket_id: int) -> Ticket:
        row = self.store._conn().execute("SELECT * FROM tickets WHERE id = ?", (int(ticket_id),)).fetchone()
        if row is None:
            raise NotFoundError(f"ticket {ticket_id} does not exist", fix="pick a ticket from the hand-off queue")
        return _ticket(row)

    def for_conversation(self, conversation_id: str) -> Ticket | None:
        row = (
            self.store._conn()
            .execute("SELECT * FROM tickets WHERE conversation_id = ? ORDER BY id DESC LIMIT 1", (conversation_id,))
            .fetchone()
        )
        return _ticket(row) if row else None

    def find(self, *, status: str | None = None, limit: int = 200) -> list[Ticket]:
        """Newest first; ``status`` one of :data:`TICKET_STATUSES` or None for all."""
        if status is not None and status not in TICKET_STATUSES:
            raise SupportBotError(f"unknown ticket status {status!r}", fix=f"use one of {', '.join(TICKET_STATUSES)}")
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        rows = (
            self.store._conn()
            .execute(f"SELECT * FROM tickets {where} ORDER BY id DESC LIMIT ?", (*args, int(limit)))
            .fetchall()
        )
        return [_ticket(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self.store._conn().execute("SELECT status, COUNT(*) AS n FROM tickets GROUP BY status").fetchall()
        out = dict.fromkeys(TICKET_STATUSES, 0)
        out.update({r["status"]: r["n"] for r in rows})
        return out

    def set_contact(self, ticket_id: int, contact: str, kind: str, expires_at: str) -> Ticket:
        with self.store._write() as conn:
            conn.execute(
                "UPDATE tickets SET contact = ?, contact_kind = ?, contact_expires_at = ?, updated_at = ? WHERE id = ?",
                (contact, kind, expires_at, self.store._now(), int(ticket_id)),
            )
        return self.get(ticket_id)

    def set_status(self, ticket_id: int, status: str) -> Ticket:
        if status not in TICKET_STATUSES:
            raise SupportBotError(f"unknown ticket status {status!r}", fix=f"use one of {', '.join(TICKET_STATUSES)}")
        self.get(ticket_id)
        with self.store._write() as conn:
            conn.execute(
                "UPDATE tickets SET status = ?, updated_at = ? WHERE id = ?", (status, self.store._now(), ticket_id)
            )
        return self.get(ticket_id)

    def erase_expired_contacts(self, now: str) -> int:
        """Erase every contact whose retention ended before ``now`` (ISO UTC); how many were erased."""
        with self.store._write() as conn:
            cursor = conn.execute(
                "UPDATE tickets SET contact = NULL, contact_kind = NULL, contact_expires_at = NULL "
                "WHERE contact IS NOT NULL AND contact_expires_at <= ?",
                (now,),
            )
            return cursor.rowcount

    # -- replies ---------------------------------------------------------------------------------
    def add_reply(self, ticket_id: int, text: str, operator: str) -> Reply:
        """An operator's reply; the ticket becomes ``answered``."""
        ticket = self.get(ticket_id)
        now = self.store._now()
        with self.store._write() as conn:
            cursor = conn.execute(
                "INSERT INTO ticket_replies (ticket_id, conversation_id, text, operator, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (ticket.id, ticket.conversation_id, text, operator, now),
            )
            conn.execute("UPDATE tickets SET status = 'answered', updated_at = ? WHERE id = ?", (now, ticket.id))
        return Reply(int(cursor.lastrowid or 0), ticket.id, ticket.conversation_id, text, operator, now)

    def replies(self, conversation_id: str, *, after: int = 0) -> list[Reply]:
        """The operators' replies in a conversation with an id above ``after``, oldest first."""
        rows = (
            self.store._conn()
            .execute(
                "SELECT * FROM ticket_replies WHERE conversation_id = ? AND id > ? ORDER BY id",
                (conversation_id, int(after)),
            )
            .fetchall()
        )
        return [
            Reply(r["id"], r["ticket_id"], r["conversation_id"], r["text"], r["operator"], r["created_at"])
            for r in rows
        ]

    # -- the notification outbox ----------------------------------------------------------------
    def enqueue(self, ticket_id: int | None, channel: str, payload: dict[str, Any]) -> int:
        if channel not in NOTIFICATION_CHANNELS:
            raise SupportBotError(f"unknown notification channel {channel!r}", fix="webhook or email")
        now = self.store._now()
        with self.store._write() as conn:
            cursor = conn.execute(
                "INSERT INTO notifications (ticket_id, channel, payload, next_attempt_at, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (ticket_id, channel, json.dumps(payload), now, now),
            )
            return int(cursor.lastrowid or 0)

    def due(self, now: str, *, limit: int = 50) -> list[Notification]:
        rows = (
            self.store._conn()
            .execute(
                "SELECT * FROM notifications WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (now, int(limit)),
            )
            .fetchall()
        )
        return [_notification(r) for r in rows]

    def notifications(self, *, ticket_id: int | None = None) -> list[Notification]:
        where, args = ("WHERE ticket_id = ?", (ticket_id,)) if ticket_id is not None else ("", ())
        rows = self.store._conn().execute(f"SELECT * FROM notifications {where} ORDER BY id", args).fetchall()
        return [_notification(r) for r in rows]

    def record_attempt(self, notification_id: int, *, error: str = "", retry_at: str | None = None) -> None:
        """One delivery attempt: sent (no ``error``), to retry at ``retry_at``, or failed for good."""
        now = self.store._now()
        with self.store._write() as conn:
            if not error:
                conn.execute(
                    "UPDATE notifications SET status = 'sent', attempts = attempts + 1, sent_at = ?, last_error = '' "
                    "WHERE id = ?",
                    (now, notification_id),
                )
            else:
                conn.execute(
                    "UPDATE notifications SET status = ?, attempts = attempts + 1, last_error = ?, "
                    "next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
                    ("pending" if retry_at else "failed", error[:500], retry_at, notification_id),
                )
