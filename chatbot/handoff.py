"""The hand-off workflow: from "I've passed your question to our support team" to a person's reply.

1. **Ticket**: every hand-off opens a ticket on its conversation (one per conversation until it is
   closed; `chatbot.tickets`), with the customer's question (redacted like everything stored).
2. **Contact**: the chat offers a field for an e-mail address or phone number (optional). It is
   validated, stored unredacted on the ticket *only* so the team can reply, and erased after
   ``handoff.contact_retention_days``.
3. **Notifications**: each new ticket is queued for the configured channels, a webhook (JSON POST
   with a ``text`` field: Slack / Mattermost / Teams-workflow incoming webhooks accept it) and
   e-mail over SMTP (the standard library's smtplib). The queue is a table, so a notification
   survives a restart; a failed delivery is retried with exponential backoff (30 s, 1 min,
   2 min... up to ``handoff.max_attempts``). :meth:`Handoff.start_worker` delivers in a background
   thread (the server starts it); :meth:`Handoff.deliver_due` is one pass (tests, CLI).
4. **Reply**: an operator answers from the console's "Hand-offs" queue; the reply is stored on the
   ticket (status ``answered``) and the chat page, which polls :meth:`Handoff.replies`, shows it
   in the customer's chat if they are still there. Closing the ticket ends it.
5. **Business hours**: outside ``handoff.hours`` (in ``handoff.timezone``) the hand-off says so
   (``handoff.outside_hours_message``).

The console and the API only call this module. Notifications carry the question and the ticket
number, never the contact (that stays in the console).
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import threading
import zoneinfo
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from typing import Any

import httpx

from chatbot.business_hours import is_open
from chatbot.settings import Settings
from chatbot.store import ConversationStore
from chatbot.tickets import Notification, Reply, Ticket, Tickets
from knowledge_base.errors import SupportBotError

__all__ = ["BACKOFF_S", "Handoff", "HandoffError", "parse_contact"]

log = logging.getLogger(__name__)

#: Seconds before the first retry; doubled after each failure.
BACKOFF_S = 30.0
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$")
_PHONE_CHARS = re.compile(r"[\s().\-/]")


class HandoffError(SupportBotError):
    """Input the hand-off workflow cannot take (a malformed contact, an empty reply)."""


def parse_contact(text: str) -> tuple[str, str]:
    """``(contact, "email" | "phone")`` from what a customer typed; ValidationError saying what is wrong."""
    value = " ".join((text or "").split())
    if not value:
        raise HandoffError("the contact is empty", fix="type an e-mail address or a phone number, or skip it")
    if "@" in value:
        if len(value) > 254 or not _EMAIL.match(value):
            raise HandoffError(f"{value!r} is not an e-mail address", fix="e.g. jane@example.com")
        return value, "email"
    digits = _PHONE_CHARS.sub("", value)
    if re.fullmatch(r"\+?\d{7,15}", digits):
        return digits, "phone"
    raise HandoffError(
        f"{value!r} is neither an e-mail address nor a phone number",
        fix="an e-mail address (jane@example.com) or a phone number with 7-15 digits (+1 555 0100)",
    )


class Handoff:
    """One process's hand-off workflow over the conversation store."""

    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        *,
        clock: Callable[[], datetime] | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self.tickets = Tickets(store)
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._http = http
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    @property
    def config(self) -> Any:
        return self.settings.handoff

    def _now(self) -> datetime:
        return self._clock().astimezone(timezone.utc)

    # -- what the customer is told -----------------------------------------------------------------
    def is_open(self, now: datetime | None = None) -> bool:
        """Whether a person is at work now (``handoff.hours`` in ``handoff.timezone``)."""
        local = (now or self._now()).astimezone(zoneinfo.ZoneInfo(self.config.timezone))
        return is_open(self.config.hours, local)

    def message(self, now: datetime | None = None) -> str:
        """The hand-off text: ``policy.handoff_message``, plus the off-hours notice outside the hours."""
        text = self.settings.policy.handoff_message
        if not self.is_open(now):
            text += "\n\n" + self.config.outside_hours_message.replace("{hours}", self.config.hours)
        return text

    # -- tickets -----------------------------------------------------------------------------------
    def open_ticket(self, conversation_id: str, message_id: int | None, question: str) -> Ticket:
        """The conversation's ticket (opened now unless one is still open); new tickets notify the team."""
        ticket, created = self.tickets.open(conversation_id, message_id, question)
        if created:
            self._enqueue(ticket)
        return ticket

    def add_contact(self, conversation_id: str, contact: str) -> Ticket:
        """Attach the customer's e-mail or phone to the conversation's ticket (validated)."""
        ticket = self.tickets.for_conversation(conversation_id)
        if ticket is None or ticket.status == "closed":
            raise SupportBotError(
                "this conversation has no open hand-off", fix="ask a question the bot passes to the team first"
            )
        value, kind = parse_contact(contact)
        expires = self._now() + timedelta(days=self.config.contact_retention_days)
        return self.tickets.set_contact(ticket.id, value, kind, expires.isoformat(timespec="microseconds"))

    def reply(self, ticket_id: int, text: str, *, operator: str = "") -> Reply:
        """An operator's answer: shown in the customer's chat (if open), ticket ``answered``."""
        text = (text or "").strip()
        if not text:
            raise HandoffError("the reply is empty", fix="type the answer to send")
        if self.tickets.get(ticket_id).status == "closed":
            raise SupportBotError(f"ticket {ticket_id} is closed", fix="reopen it first (set it back to open)")
        return self.tickets.add_reply(ticket_id, text, operator)

    def close(self, ticket_id: int) -> Ticket:
        return self.tickets.set_status(ticket_id, "closed")

    def reopen(self, ticket_id: int) -> Ticket:
        return self.tickets.set_status(ticket_id, "open")

    def replies(self, conversation_id: str, *, after: int = 0) -> list[Reply]:
        """The operators' replies the customer's chat has not shown yet (ids above ``after``)."""
        return self.tickets.replies(conversation_id, after=after)

    def queue(self, status: str | None = None, *, limit: int = 200) -> list[Ticket]:
        """The console's hand-off queue, newest first; erases expired contacts first."""
        self.erase_expired_contacts()
        return self.tickets.find(status=status, limit=limit)

    def transcript(self, ticket_id: int, *, limit: int = 200) -> list[dict[str, Any]]:
        """The ticket's conversation with the operators' replies, in order of time."""
        ticket = self.tickets.get(ticket_id)
        turns: list[dict[str, Any]] = [
            {
                "when": m.created_at,
                "who": "customer" if m.role == "user" else "bot",
                "text": m.text,
                "mode": m.mode or "",
            }
            for m in self.tickets.store.history(ticket.conversation_id, limit=limit)
        ]
        turns += [
            {"when": r.created_at, "who": f"operator {r.operator}".strip(), "text": r.text, "mode": "reply"}
            for r in self.tickets.replies(ticket.conversation_id)
        ]
        return sorted(turns, key=lambda t: t["when"])

    def erase_expired_contacts(self) -> int:
        return self.tickets.erase_expired_contacts(self._now().isoformat(timespec="microseconds"))

    # -- notifications -----------------------------------------------------------------------------
    def _text(self, ticket: Ticket) -> str:
        when = "" if self.is_open() else " (outside business hours)"
        return (
            f"New hand-off #{ticket.id}{when}: “{ticket.question}”. "
            "Open the SupportBot console's Hand-offs tab to read the conversation and reply."
        )

    def _enqueue(self, ticket: Ticket) -> None:
        text = self._text(ticket)
        if self.config.webhook_url:
            payload = {"text": text, "ticket": {"id": ticket.id, "question": ticket.question, "status": ticket.status}}
            self.tickets.enqueue(ticket.id, "webhook", payload)
        if self.config.smtp_host:
            self.tickets.enqueue(ticket.id, "email", {"subject": f"SupportBot hand-off #{ticket.id}", "text": text})
        self._wake.set()

    def _send(self, item: Notification) -> None:
        config = self.config
        if item.channel == "webhook":
            client = self._http or httpx.Client(timeout=10.0)
            try:
                response = client.post(config.webhook_url, json=item.payload)
            finally:
                if client is not self._http:
                    client.close()
            if response.status_code >= 300:
                raise SupportBotError(f"the webhook answered HTTP {response.status_code}: {response.text[:200]}")
            return
        message = EmailMessage()
        message["Subject"] = str(item.payload.get("subject", "SupportBot hand-off"))
        message["From"] = config.smtp_from
        message["To"] = ", ".join(a.strip() for a in config.smtp_to.split(",") if a.strip())
        message.set_content(str(item.payload.get("text", "")))
        with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=15) as smtp:
            if config.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if config.smtp_user:
                smtp.login(config.smtp_user, config.smtp_password)
            smtp.send_message(message)

    def deliver_due(self) -> dict[str, int]:
        """One pass over the outbox: send what is due, schedule retries; counts by outcome."""
        now = self._now()
        self.erase_expired_contacts()
        counts = {"sent": 0, "retry": 0, "failed": 0}
        for item in self.tickets.due(now.isoformat(timespec="microseconds")):
            try:
                self._send(item)
            except (OSError, smtplib.SMTPException, httpx.HTTPError, SupportBotError) as exc:
                error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                if item.attempts + 1 >= self.config.max_attempts:
                    self.tickets.record_attempt(item.id, error=error)
                    counts["failed"] += 1
                    log.warning("hand-off notification %s (%s) given up: %s", item.id, item.channel, error)
                else:
                    retry = now + timedelta(seconds=BACKOFF_S * 2**item.attempts)
                    self.tickets.record_attempt(item.id, error=error, retry_at=retry.isoformat(timespec="microseconds"))
                    counts["retry"] += 1
                    log.info(
                        "hand-off notification %s (%s) failed, retry at %s: %s", item.id, item.channel, retry, error
                    )
                continue
            self.tickets.record_attempt(item.id)
            counts["sent"] += 1
        return counts

    def start_worker(self, interval_s: float = 15.0) -> None:
        """Deliver in a background thread: at once when a ticket is opened, else every ``interval_s``."""
        if self._worker is not None:
            return

        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.deliver_due()
                except Exception:  # the worker must outlive a bad pass (e.g. the store briefly locked)
                    log.exception("hand-off notification pass failed")
                self._wake.wait(interval_s)
                self._wake.clear()

        self._worker = threading.Thread(target=run, name="handoff-notify", daemon=True)
        self._worker.start()

    def stop_worker(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=5)
            self._worker = None
