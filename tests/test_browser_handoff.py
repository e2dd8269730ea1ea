"""A hand-off that reaches a person, end to end in headless Chromium (#15 item 3).

The customer is handed off, leaves an e-mail address; the team gets an e-mail (a real local SMTP
server, aiosmtpd) and a webhook call (a local receiver); an operator opens the ticket in the
console's Hand-offs tab and replies; the reply appears in the customer's open chat.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from test_browser import (
    BROWSER_ARGS,
    CHROMIUM,
    DESKTOP,
    PASSWORD,
    UNANSWERABLE,
    SlowEcho,
    ask,
    bot_messages,
    free_port,
    sync_api,
    wait_answers,
)

from chatbot.services import build_engine, demo_file
from chatbot.settings import load_settings

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        type(self).received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


def until(condition: Any, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def team(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The support team's side: an SMTP inbox and a webhook receiver on loopback."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    inbox: list[Any] = []

    class Collect(Message):
        def handle_message(self, message: Any) -> None:
            inbox.append(message)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        smtp_port = probe.getsockname()[1]
    smtp = Controller(Collect(), hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    Hook.received = []
    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        yield {"inbox": inbox, "smtp_port": smtp_port, "hook_url": f"http://127.0.0.1:{hook.server_address[1]}/hook"}
    finally:
        smtp.stop()
        hook.shutdown()
        hook.server_close()


def test_a_handoff_is_mailed_posted_answered_from_the_console_and_shown_in_the_chat(
    tmp_path: Path, team: dict[str, Any]
) -> None:
    import uvicorn
    from conftest import HashingEmbedder

    from ui.auth import hash_password
    from ui.server import create_app

    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(tmp_path / "data"),
            "server.admin_password_hash": hash_password(PASSWORD, iterations=1000),
            "server.api_key": "test-key",
            "server.rate_limit_per_minute": "0",
            "policy.faq_threshold": "0.66",
            "policy.relevance_threshold": "0.60",
            "policy.clarify_margin": "0.02",
            "policy.generation": "on",
            "handoff.webhook_url": team["hook_url"],
            "handoff.smtp_host": "127.0.0.1",
            "handoff.smtp_port": str(team["smtp_port"]),
            "handoff.smtp_starttls": "false",
            "handoff.smtp_from": "bot@shop.example",
            "handoff.smtp_to": "team@shop.example",
        },
    )
    engine = build_engine(settings, embedder=HashingEmbedder(), generator=SlowEcho())
    engine.kb.add_files([demo_file()])
    engine.handoff.start_worker(interval_s=0.5)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine), host="127.0.0.1", port=free_port()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started, what="the server")
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
            chat = browser.new_page(viewport=DESKTOP)
            chat.goto(url + "/")
            chat.wait_for_selector("#sb-chat .example", timeout=60_000)
            ask(chat, UNANSWERABLE)
            assert "Passed to our support team" in wait_answers(chat, 1)
            chat.wait_for_selector("#sb-contact-box", state="visible", timeout=30_000)
            chat.locator("#sb-contact textarea").fill("jane@example.com")
            chat.locator("#sb-contact-send").click()
            chat.wait_for_selector("#sb-contact-box", state="hidden", timeout=30_000)
            until(lambda: engine.handoff.queue() and engine.handoff.queue()[0].contact, what="the contact")
            until(lambda: team["inbox"] and Hook.received, what="the e-mail and the webhook call")
            assert "weather on Mars" in team["inbox"][0].get_payload()
            assert "weather on Mars" in Hook.received[0]["text"]

            console = browser.new_page(viewport={"width": 1366, "height": 900})
            console.goto(url + "/admin/")
            console.get_by_label("username").fill(settings.server.admin_user)
            console.get_by_label("password").fill(PASSWORD)
            console.get_by_role("button", name="Login").click()
            console.wait_for_selector("#sb-entries", timeout=60_000)
            console.get_by_role("tab", name="Hand-offs").click()
            console.wait_for_selector("#sb-tickets", state="visible", timeout=30_000)
            until(lambda: "jane@example.com" in console.locator("#sb-tickets").inner_text(), what="the queue")
            console.wait_for_selector("#sb-tickets [role='gridcell']", timeout=30_000)
            console.locator("#sb-tickets [role='gridcell']").filter(has_text="jane@example.com").first.click()
            console.wait_for_selector("#sb-ticket-reply", state="visible", timeout=30_000)
            console.locator("#sb-ticket-reply textarea").fill("Hi Jane, we don't deliver to Mars yet.")
            console.get_by_role("button", name="Send reply").click()
            until(lambda: engine.handoff.replies(engine.handoff.queue()[0].conversation_id), what="the reply")

            until(
                lambda: "deliver to Mars yet" in " ".join(bot_messages(chat).all_inner_texts()),
                timeout_s=30,
                what="the reply in the customer's chat",
            )
            assert "Support team" in bot_messages(chat).last.inner_text()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        engine.handoff.stop_worker()
        engine.store.close()
        engine.kb.close()
