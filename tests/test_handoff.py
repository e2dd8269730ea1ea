"""A hand-off that reaches a person (#15 item 3): ticket, contact, reply, notifications, hours.

Notifications go to real local servers: an ``http.server`` webhook receiver in a thread (which
fails its first request, to show the retry) and an aiosmtpd SMTP server.
"""

from __future__ import annotations

import json
import socket
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from test_engine import ENTRIES, ScriptedGenerator

from chatbot.business_hours import is_open, parse_hours
from chatbot.handoff import BACKOFF_S, Handoff, HandoffError, parse_contact
from chatbot.services import build_engine
from chatbot.settings import Settings
from knowledge_base.errors import ConfigError

OUT_OF_SCOPE = "What's the weather on Mars?"


class Clock:
    """Real time, moved forward by hand (the store's own stamps use real time)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


def engine_for(settings: Settings, embedder, **handoff: Any):
    settings = settings.replace(handoff=handoff, policy={"relevance_threshold": 0.99, "faq_threshold": 0.995})
    engine = build_engine(settings, embedder=embedder, generator=ScriptedGenerator("unused"))
    engine.kb.upsert(ENTRIES)
    clock = Clock()
    engine.handoff = Handoff(settings, engine.store, clock=clock)
    return engine, clock


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("jane.doe@example.com", ("jane.doe@example.com", "email")),
        (" +1 (555) 010-0199 ", ("+15550100199", "phone")),
        ("030 1234567", ("0301234567", "phone")),
    ],
)
def test_a_contact_is_an_email_or_a_phone(typed: str, expected: tuple[str, str]) -> None:
    assert parse_contact(typed) == expected


@pytest.mark.parametrize("typed", ["", "jane@", "call me maybe", "12345", "a@b"])
def test_a_bad_contact_is_refused_clearly(typed: str) -> None:
    with pytest.raises(HandoffError) as info:
        parse_contact(typed)
    assert info.value.fix


def test_business_hours() -> None:
    assert parse_hours("") == []
    monday_10 = datetime(2026, 11, 30, 10, 0)
    saturday_10 = datetime(2026, 12, 5, 10, 0)
    assert is_open("Mon-Fri 09:00-17:00", monday_10) and not is_open("Mon-Fri 09:00-17:00", saturday_10)
    assert is_open("Mon-Fri 09:00-17:00, Sat 09:30-12:00", saturday_10)
    assert not is_open("Mon-Fri 09:00-17:00", monday_10.replace(hour=17))
    with pytest.raises(ValueError, match="Mon-Fri"):
        parse_hours("weekdays 9-5")


def test_hours_and_timezone_are_validated(settings: Settings) -> None:
    from chatbot.settings import load_settings

    with pytest.raises(ConfigError) as info:
        load_settings(
            env={},
            overrides={
                "data_dir": str(settings.data_dir),
                "handoff.hours": "9 to 5",
                "handoff.timezone": "Mars/Olympus",
                "handoff.smtp_host": "mail.example.com",
            },
        )
    text = str(info.value)
    assert "handoff.hours" in text and "handoff.timezone" in text and "smtp_from" in text


def test_outside_hours_the_handoff_says_so(settings: Settings, embedder) -> None:
    engine, _ = engine_for(settings, embedder, hours="Mon-Fri 09:00-17:00", timezone="Europe/Berlin")
    sunday = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
    monday = datetime(2026, 12, 7, 9, 30, tzinfo=timezone.utc)
    assert "offline" in engine.handoff.message(sunday) and "Mon-Fri 09:00-17:00" in engine.handoff.message(sunday)
    assert engine.handoff.message(monday) == settings.policy.handoff_message


def test_a_handoff_opens_one_ticket_per_conversation_with_the_contact(settings: Settings, embedder) -> None:
    engine, clock = engine_for(settings, embedder, contact_retention_days=30)
    first = engine.answer(OUT_OF_SCOPE)
    assert first.mode == "handoff" and first.ticket_id is not None
    again = engine.answer("and on Venus?", first.conversation_id)
    assert again.ticket_id == first.ticket_id
    assert [t.id for t in engine.handoff.queue("open")] == [first.ticket_id]

    with pytest.raises(HandoffError):
        engine.handoff.add_contact(first.conversation_id, "not a contact")
    ticket = engine.handoff.add_contact(first.conversation_id, "jane@example.com")
    assert ticket.contact == "jane@example.com" and ticket.contact_kind == "email"
    # Only the ticket keeps it: every stored message is redacted as before.
    assert all("jane@example.com" not in m.text for m in engine.store.history(first.conversation_id))

    clock.offset = timedelta(days=31)
    assert engine.handoff.queue()[0].contact is None  # erased after the retention period


def test_an_operator_reply_reaches_the_customers_chat_and_the_ticket_closes(settings: Settings, embedder) -> None:
    engine, _ = engine_for(settings, embedder)
    answer = engine.answer(OUT_OF_SCOPE)
    assert engine.handoff.replies(answer.conversation_id) == []
    reply = engine.handoff.reply(answer.ticket_id, "Hi! Mars is cold today.", operator="admin")
    assert engine.handoff.tickets.get(answer.ticket_id).status == "answered"
    shown = engine.handoff.replies(answer.conversation_id)
    assert [r.text for r in shown] == ["Hi! Mars is cold today."]
    assert engine.handoff.replies(answer.conversation_id, after=reply.id) == []  # polled: nothing new
    transcript = engine.handoff.transcript(answer.ticket_id)
    assert [t["who"] for t in transcript] == ["customer", "bot", "operator admin"]
    engine.handoff.close(answer.ticket_id)
    assert engine.handoff.queue("closed")[0].id == answer.ticket_id
    with pytest.raises(HandoffError):
        engine.handoff.reply(answer.ticket_id, "   ")
    # A new question after closing opens a new ticket.
    assert engine.answer(OUT_OF_SCOPE, answer.conversation_id).ticket_id != answer.ticket_id


class Receiver(BaseHTTPRequestHandler):
    """A Slack-style incoming webhook that fails its first ``failures`` requests."""

    failures = 1
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append(body)
        failing = len(type(self).received) <= type(self).failures
        self.send_response(500 if failing else 200)
        self.end_headers()
        self.wfile.write(b"boom" if failing else b"ok")

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def receiver() -> Any:
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T000/B000/xyz"
    server.shutdown()
    server.server_close()


def test_the_webhook_is_called_and_retried_after_a_failure(settings: Settings, embedder, receiver: str) -> None:
    engine, clock = engine_for(settings, embedder, webhook_url=receiver)
    answer = engine.answer(OUT_OF_SCOPE)
    assert engine.handoff.deliver_due() == {"sent": 0, "retry": 1, "failed": 0}
    (item,) = engine.handoff.tickets.notifications(ticket_id=answer.ticket_id)
    assert item.status == "pending" and "500" in item.last_error
    assert engine.handoff.deliver_due() == {"sent": 0, "retry": 0, "failed": 0}  # not due yet
    clock.offset = timedelta(seconds=BACKOFF_S + 1)
    assert engine.handoff.deliver_due()["sent"] == 1
    assert len(Receiver.received) == 2
    payload = Receiver.received[-1]
    assert "weather on Mars" in payload["text"] and payload["ticket"]["id"] == answer.ticket_id
    assert engine.handoff.tickets.notifications()[0].status == "sent"


def test_a_notification_is_given_up_after_max_attempts(settings: Settings, embedder, receiver: str) -> None:
    Receiver.failures = 99
    try:
        engine, clock = engine_for(settings, embedder, webhook_url=receiver, max_attempts=2)
        engine.answer(OUT_OF_SCOPE)
        engine.handoff.deliver_due()
        clock.offset = timedelta(hours=1)
        assert engine.handoff.deliver_due()["failed"] == 1
        assert engine.handoff.tickets.notifications()[0].status == "failed"
    finally:
        Receiver.failures = 1


def test_the_team_gets_an_email_through_a_real_smtp_server(settings: Settings, embedder) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    inbox: list[Any] = []

    class Collect(Message):
        def handle_message(self, message: Any) -> None:
            inbox.append(message)

    with socket.socket() as probe:  # a free port (aiosmtpd's start-up check needs a real one)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Collect(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        engine, _ = engine_for(
            settings,
            embedder,
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_starttls=False,
            smtp_from="bot@shop.example",
            smtp_to="team@shop.example, lead@shop.example",
        )
        answer = engine.answer(OUT_OF_SCOPE)
        engine.handoff.add_contact(answer.conversation_id, "+1 555 0100 99")
        assert engine.handoff.deliver_due()["sent"] == 1
    finally:
        controller.stop()
    (mail,) = inbox
    assert mail["Subject"] == f"SupportBot hand-off #{answer.ticket_id}"
    assert mail["To"] == "team@shop.example, lead@shop.example"
    assert "weather on Mars" in mail.get_payload()
    assert "555" not in mail.get_payload()  # the contact stays in the console


def test_the_worker_delivers_in_the_background(settings: Settings, embedder, receiver: str) -> None:
    Receiver.failures = 0
    try:
        engine, _ = engine_for(settings, embedder, webhook_url=receiver)
        engine.handoff.start_worker(interval_s=0.2)
        try:
            engine.answer(OUT_OF_SCOPE)
            deadline = datetime.now() + timedelta(seconds=10)
            while not Receiver.received and datetime.now() < deadline:
                threading.Event().wait(0.05)
        finally:
            engine.handoff.stop_worker()
        assert Receiver.received
    finally:
        Receiver.failures = 1


# -- the chat page ----------------------------------------------------------------------------------


def page_fn(page: Any, name: str) -> Any:
    return next(f.fn for f in page.fns.values() if f.api_name == name)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_chat_page_asks_for_a_contact_and_shows_the_teams_reply(settings: Settings, embedder) -> None:
    from ui import chat_page

    engine, _ = engine_for(settings, embedder)
    page = chat_page.build_chat_page(engine)
    *_, last = page_fn(page, "chat")(OUT_OF_SCOPE, [], chat_page.new_session())
    history, session = last[1]["value"], last[2]
    box, timer = page_fn(page, "after_answer")(session)
    assert box["visible"] is True and timer.active is True

    session, _, error = page_fn(page, "send_contact")("nope", session)
    assert "neither an e-mail" in error
    session, box, error = page_fn(page, "send_contact")("jane@example.com", session)
    assert box["visible"] is False and error == "" and session["contact_given"]
    assert engine.handoff.queue()[0].contact == "jane@example.com"
    assert page_fn(page, "after_answer")(session)[0]["visible"] is False  # asked once

    poll = page_fn(page, "poll_replies")
    nothing = ({"__type__": "update"}, {"__type__": "update"})  # gr.skip(): no change to the page
    assert poll(history, session) == nothing
    engine.handoff.reply(session["ticket_id"], "We don't ship to Mars yet, sorry!", operator="admin")
    shown, session = poll(history, session)
    assert "Support team" in shown[-1]["content"] and "ship to Mars" in shown[-1]["content"]
    assert poll(shown, session) == nothing  # shown once


def test_no_contact_field_or_polling_without_a_handoff(settings: Settings, embedder) -> None:
    from ui import chat_page

    engine, _ = engine_for(settings, embedder)
    page = chat_page.build_chat_page(engine)
    box, timer = page_fn(page, "after_answer")(chat_page.new_session())
    assert box["visible"] is False and timer.active is False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_console_queue_opens_a_ticket_replies_and_closes_it(settings: Settings, embedder) -> None:
    import gradio as gr

    from ui import console

    engine, _ = engine_for(settings, embedder)
    answer = engine.answer(OUT_OF_SCOPE)
    engine.handoff.add_contact(answer.conversation_id, "jane@example.com")
    page = console.build_console(engine, engine.settings)
    frame, counts = page_fn(page, "refresh_tickets")("Open")
    assert list(frame["ticket"]) == [answer.ticket_id] and "jane@example.com" in list(frame["contact"])
    assert "**1** open" in counts

    select = gr.SelectData(None, {"index": [0, 0], "value": answer.ticket_id, "selected": True})
    ticket_id, shown, box, _ = page_fn(page, "pick_ticket")(frame, select)
    assert ticket_id == answer.ticket_id and box["visible"] is True
    assert "weather on Mars" in shown and "jane@example.com" in shown

    class Login:
        username = "lead"

    out = page_fn(page, "reply_ticket")(ticket_id, "We don't ship to Mars.", "Open", Login())
    assert "Reply sent" in out[-1] and "operator lead" in out[2]
    assert engine.handoff.replies(answer.conversation_id)[0].operator == "lead"
    assert engine.handoff.tickets.get(ticket_id).status == "answered"
    out = page_fn(page, "close_ticket")(ticket_id, "", "All", Login())
    assert engine.handoff.tickets.get(ticket_id).status == "closed" and "closed" in out[-1]
    refused = page_fn(page, "reply_ticket")(ticket_id, "again", "All", Login())
    assert "closed" in refused[-1]


# -- over HTTP --------------------------------------------------------------------------------------


def test_api_clients_leave_a_contact_and_poll_the_teams_replies(settings: Settings, embedder) -> None:
    from fastapi.testclient import TestClient

    from ui.auth import Auth
    from ui.server import create_app

    engine, _ = engine_for(settings.replace(server={"rate_limit_per_minute": 0}), embedder)
    auth = Auth(engine.settings, announce=lambda _text: None, iterations=1000)
    app = create_app(engine.settings, engine, chat_ui=False, console_ui=False, auth=auth)
    with TestClient(app) as client:
        answer = client.post("/api/chat", json={"message": OUT_OF_SCOPE}).json()
        assert answer["mode"] == "handoff"
        mine = {"conversation_id": answer["conversation_id"], "conversation_token": answer["conversation_token"]}
        bad = client.post("/api/handoff/contact", json={**mine, "contact": "call me"})
        assert bad.status_code == 400 and bad.json()["fix"]
        stranger = client.post(
            "/api/handoff/contact", json={**mine, "conversation_token": "x" * 20, "contact": "a@b.co"}
        )
        assert stranger.status_code == 404
        ok = client.post("/api/handoff/contact", json={**mine, "contact": "jane@example.com"}).json()
        assert ok["contact_kind"] == "email"

        assert client.post("/api/handoff/replies", json=mine).json()["replies"] == []
        engine.handoff.reply(ok["ticket_id"], "Mars is out of our delivery area.", operator="lead")
        polled = client.post("/api/handoff/replies", json=mine).json()
        assert polled["status"] == "answered" and polled["replies"][0]["text"].startswith("Mars is out")
        after = polled["replies"][0]["id"]
        assert client.post("/api/handoff/replies", json={**mine, "after": after}).json()["replies"] == []
    engine.store.close()
    engine.kb.close()
