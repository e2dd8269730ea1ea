"""The served app's web security (docs/security.md, issue 17), over real HTTP.

The whole app (``ui.server.create_app``: the API, the chat page and the console) runs under uvicorn
on a free loopback port, reached with httpx; the cookie tests also drive Debian's headless Chromium
(marked ``browser``). The server believes ``X-Forwarded-*`` from 127.0.0.1 (``server.trusted_proxies``),
so each test speaks as its own client address and HTTPS can be simulated as a TLS proxy would.

The tests that lock the admin account out come last: the login throttle is the server's, shared.
"""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import HashingEmbedder

from chatbot.engine import ChatEngine
from chatbot.services import build_engine, demo_file
from chatbot.settings import Settings, load_settings, write_data_dir_config
from chatbot.store import MIGRATIONS, ConversationStore, owner_hash
from ui.auth import Auth, hash_password
from ui.ratelimit import ACCOUNT_FREE_FAILURES, CLIENT_FREE_FAILURES, LoginThrottle
from ui.security import CLIENT_COOKIE
from ui.server import create_app

pytestmark = [
    # gr.Blocks() drops asyncio loops unclosed (gradio.utils.safe_get_lock): Gradio's leak, not ours.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

PASSWORD = "security-test-password"
API_KEY = "sb-security-test-key"
LISTED_ORIGIN = "https://shop.example"
EVIL = "https://evil.example"
RATE_LIMIT = 6
FAQ_QUESTION = "How do I cancel an order?"
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Live:
    def __init__(self, url: str, engine: ChatEngine, settings: Settings) -> None:
        self.url, self.engine, self.settings = url, engine, settings
        self.port = int(url.rsplit(":", 1)[1])

    def client(self, address: str, **kwargs: Any) -> httpx.Client:
        """An HTTP client that the server sees as ``address`` (through the trusted proxy 127.0.0.1)."""
        headers = {"X-Forwarded-For": address, **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    import uvicorn

    data = tmp_path_factory.mktemp("security") / "data"
    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(data),
            "model.model": str(tiny_model_dir),
            "model.device": "cpu",
            "model.max_new_tokens": "8",
            "server.admin_password_hash": hash_password(PASSWORD, iterations=1000),
            "server.api_key": API_KEY,
            "server.rate_limit_per_minute": str(RATE_LIMIT),
            "server.trusted_proxies": "127.0.0.1",
            "server.cors_origins": LISTED_ORIGIN,
        },
    )
    engine = build_engine(settings, embedder=HashingEmbedder())
    engine.kb.add_files([demo_file()])
    app = create_app(settings, engine, auth=Auth(settings, announce=lambda _: None, iterations=1000))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started, "the server did not start"
    try:
        yield Live(f"http://127.0.0.1:{port}", engine, settings)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.store.close()
        engine.kb.close()


def basic(password: str = PASSWORD, user: str = "admin") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


BEARER = {"Authorization": f"Bearer {API_KEY}"}


def console_login(client: httpx.Client, password: str = PASSWORD) -> httpx.Response:
    return client.post("/admin/login", data={"username": "admin", "password": password})


def gradio_call(client: httpx.Client, message: str) -> tuple[str, Any]:
    """The chat page's ``chat`` event through ``/gradio_api/call/chat``: ``(event, data)`` of its end."""
    started = client.post("/gradio_api/call/chat", json={"data": [message, []]})
    assert started.status_code == 200, started.text
    event_id = started.json()["event_id"]
    last: tuple[str, Any] = ("", None)
    with client.stream("GET", f"/gradio_api/call/chat/{event_id}") as stream:
        event = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                last = (event, json.loads(line[len("data: ") :]))
    return last


# -- 1. CORS and cross-site requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/config"), ("GET", "/config"), ("OPTIONS", "/api/kb/entries/x"), ("OPTIONS", "/api/chat")],
)
def test_no_origin_is_reflected_under_a_public_host(live: Live, method: str, path: str) -> None:
    headers = {"Host": "support.example.com", "Origin": EVIL, "Access-Control-Request-Method": "DELETE"}
    with live.client("198.51.100.1", headers=headers) as client:
        response = client.request(method, path)
    assert response.headers.get("access-control-allow-origin") is None
    assert response.headers.get("access-control-allow-credentials") is None


def test_a_listed_origin_is_allowed_exactly(live: Live) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Host": "support.example.com"}
    with live.client("198.51.100.2", headers=preflight) as client:
        listed = client.options("/api/chat", headers={"Origin": LISTED_ORIGIN})
        lookalike = client.options("/api/chat", headers={"Origin": LISTED_ORIGIN + ".evil.example"})
    assert listed.headers["access-control-allow-origin"] == LISTED_ORIGIN
    assert "access-control-allow-credentials" not in listed.headers
    assert "access-control-allow-origin" not in lookalike.headers


def test_cross_site_writes_are_refused_on_every_route(live: Live) -> None:
    entry = {"id": "csrf-test", "question": "Is this a forged request?", "answer": "It must not be stored."}
    with live.client("198.51.100.3") as client:
        forged = [
            client.post("/api/kb/entries", json=entry, headers={**basic(), "Origin": EVIL}),
            client.post("/api/kb/entries", json=entry, headers={**BEARER, "Origin": EVIL}),
            client.delete("/api/kb/entries/orders-002", headers={**BEARER, "Sec-Fetch-Site": "cross-site"}),
            client.post("/api/chat", json={"message": FAQ_QUESTION}, headers={"Origin": "null"}),
            client.post("/admin/gradio_api/queue/join", json={}, headers={"Origin": EVIL}),
            client.post("/admin/login", data={"username": "admin", "password": PASSWORD}, headers={"Origin": EVIL}),
        ]
        assert [r.status_code for r in forged] == [403] * len(forged)
        assert all(r.json()["error"] == "CrossSiteRequest" for r in forged)
        assert "csrf-test" not in {e.id for e in live.engine.kb.entries()}
        # Basic is refused from another site even for reading (the browser would attach it).
        read = client.get("/api/kb/entries", headers={**basic(), "Sec-Fetch-Site": "cross-site"})
        assert read.status_code == 403
        assert client.get("/api/kb/entries", headers={**BEARER, "Sec-Fetch-Site": "cross-site"}).status_code == 200
        # The site itself, a listed origin and server-side clients (no Origin) pass.
        own = client.post("/api/chat", json={"message": FAQ_QUESTION}, headers={"Origin": live.url})
        listed = client.post("/api/chat", json={"message": FAQ_QUESTION}, headers={"Origin": LISTED_ORIGIN})
        assert own.status_code == 200 and listed.status_code == 200
        stored = client.post("/api/kb/entries", json=entry, headers=basic())
        assert stored.status_code == 201
        assert client.delete("/api/kb/entries/csrf-test", headers=BEARER).status_code == 200


def test_the_console_cookie_is_samesite_lax_and_secure_behind_https(live: Live) -> None:
    with live.client("198.51.100.4") as client:
        plain = console_login(client)
    with live.client("198.51.100.4", headers={"X-Forwarded-Proto": "https"}) as client:
        tls = console_login(client)
    for response, secure in ((plain, False), (tls, True)):
        assert response.status_code == 200
        cookies = [c for c in response.headers.get_list("set-cookie") if c.startswith("access-token")]
        assert len(cookies) == 2
        for cookie in cookies:
            attributes = [a.strip().lower() for a in cookie.split(";")]
            assert "samesite=lax" in attributes and "httponly" in attributes
            assert ("secure" in attributes) is secure


# -- 3. one rate limiter in front of the engine -------------------------------------------------------


def test_every_route_to_the_engine_shares_the_rate_limit(live: Live) -> None:
    v1 = {"messages": [{"role": "user", "content": FAQ_QUESTION}]}
    with live.client("198.51.100.5") as client:
        answered = [client.post("/api/chat", json={"message": FAQ_QUESTION}).status_code for _ in range(2)]
        answered += [client.post("/v1/chat/completions", json=v1, headers=BEARER).status_code for _ in range(2)]
        events = [gradio_call(client, FAQ_QUESTION)[0] for _ in range(RATE_LIMIT - 4)]
        assert answered == [200] * 4 and events == ["complete"] * (RATE_LIMIT - 4)
        # The bucket is empty now, whichever door is tried.
        assert client.post("/api/chat", json={"message": FAQ_QUESTION}).status_code == 429
        assert client.post("/v1/chat/completions", json=v1, headers=BEARER).status_code == 429
        event, data = gradio_call(client, FAQ_QUESTION)
        assert event == "error" and "too quickly" in json.dumps(data)
    with live.client("198.51.100.6") as other:  # another client has its own bucket
        assert other.post("/api/chat", json={"message": FAQ_QUESTION}).status_code == 200


# -- 4. no anonymous files ------------------------------------------------------------------------------


def test_the_public_page_takes_and_serves_no_files(live: Live, tmp_path: Path) -> None:
    files = {"files": ("note.txt", b"anonymous upload", "text/plain")}
    with live.client("198.51.100.7") as client:
        upload = client.post("/gradio_api/upload", files=files)
        assert upload.status_code == 403 and upload.json()["error"] == "Forbidden"
        for variant in ("/gradio_api/upload/", "/gradio_api/%75pload", "//gradio_api/upload", "/./gradio_api/upload"):
            assert client.post(variant, files=files).status_code in (403, 404, 405), variant
        assert client.get("/gradio_api/file=/etc/hostname").status_code == 403
        assert client.post("/admin/gradio_api/upload", files=files).status_code == 401  # the console's: login
        assert console_login(client).status_code == 200
        stored = client.post("/admin/gradio_api/upload", files=files)
        assert stored.status_code == 200, stored.text
        path = stored.json()[0]
        assert client.get(f"/gradio_api/file={path}").status_code == 403  # not through the public page
        assert client.get(f"/admin/gradio_api/file={path}").status_code == 200


def test_console_uploads_are_deleted_when_the_server_stops(tmp_path: Path, tiny_model_dir: Path) -> None:
    import gradio as gr
    import uvicorn

    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(tmp_path / "data"),
            "model.model": str(tiny_model_dir),
            "server.admin_password_hash": hash_password(PASSWORD, iterations=1000),
            "server.api_key": API_KEY,
        },
    )
    engine = build_engine(settings, embedder=HashingEmbedder())
    with gr.Blocks() as console_page:
        gr.File(label="FAQ files")
    app = create_app(
        settings, engine, chat_ui=False, console_ui=console_page, auth=Auth(settings, announce=lambda _: None)
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert console_login(client).status_code == 200
            uploaded = client.post("/admin/gradio_api/upload", files={"files": ("faq.csv", b"q,a\n", "text/csv")})
            path = Path(uploaded.json()[0])
            assert path.is_file()
    finally:
        server.should_exit = True
        thread.join(20)
        engine.store.close()
        engine.kb.close()
    assert not path.exists()


# -- 5. a conversation belongs to its client --------------------------------------------------------------


def test_a_conversation_is_reachable_only_with_its_token(live: Live) -> None:
    with live.client("198.51.100.8") as alice, live.client("198.51.100.9") as mallory:
        first = alice.post("/api/chat", json={"message": "Please cancel order 4711 for Alice"}).json()
        cid, token = first["conversation_id"], first["conversation_token"]
        assert len(token) >= 43 and token not in json.dumps(live.engine.store.history(cid)[0].__dict__)

        refused = [
            mallory.post("/api/chat", json={"message": "what did I ask?", "conversation_id": cid}),
            mallory.post("/api/chat", json={"message": "what?", "conversation_id": cid, "conversation_token": "guess"}),
            mallory.post("/api/chat", json={"message": "what?", "conversation_id": cid, "stream": True}),
            mallory.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "what?"}], "conversation_id": cid},
                headers=BEARER,  # this server wants the API key on /v1: it does not open others' conversations
            ),
        ]
        unknown = mallory.post(
            "/api/chat", json={"message": "what?", "conversation_id": "0" * 32, "conversation_token": "guess"}
        )
        assert [r.status_code for r in refused] == [404] * 4 and unknown.status_code == 404
        # One answer for somebody else's conversation and for none: nothing to learn from it.
        assert {r.json()["message"] for r in [*refused[:3], unknown]} == {unknown.json()["message"]}
        assert "Alice" not in "".join(r.text for r in refused)

        rate = {"rating": "down", "comment": "forged"}
        answer_id = first["message_id"]
        for forged in (
            {"message_id": answer_id, "conversation_token": "guess"},
            {"message_id": answer_id - 1, "conversation_token": token},  # the customer's own message
            {"message_id": 10**9, "conversation_token": token},
        ):
            response = mallory.post("/api/feedback", json={**forged, **rate})
            assert response.status_code == 404
            assert response.json()["message"] == "no answer with this id in this client's conversations"
        feedback = "SELECT count(*) FROM feedback WHERE message_id = ?"
        assert live.engine.store._conn().execute(feedback, (answer_id,)).fetchone()[0] == 0

        follow = alice.post(
            "/api/chat", json={"message": "thanks", "conversation_id": cid, "conversation_token": token}
        )
        assert follow.status_code == 200 and follow.json()["conversation_id"] == cid
        mine = alice.post("/api/feedback", json={"message_id": answer_id, "conversation_token": token, **rate})
        assert mine.status_code == 200
        assert live.engine.store._conn().execute(feedback, (answer_id,)).fetchone()[0] == 1

        v1 = alice.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "and?"}],
                "conversation_id": cid,
                "conversation_token": token,
            },
            headers=BEARER,
        )
        assert v1.status_code == 200 and v1.json()["supportbot"]["conversation_id"] == cid


def test_the_token_is_stored_hashed_and_old_conversations_have_no_owner(tmp_path: Path) -> None:
    path = tmp_path / "conversations.sqlite3"
    with sqlite3.connect(path) as conn:  # a database of schema 2, from before owners
        for step in MIGRATIONS[:2]:
            for statement in step:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        conn.execute("INSERT INTO conversations (id, created_at) VALUES ('old', '2026-01-01T00:00:00+00:00')")
    store = ConversationStore(path)
    try:
        assert not store.owns("", "old") and not store.owns("anything", "old")
        cid = store.create_conversation(owner="secret-token")
        stored = sqlite3.connect(path).execute("SELECT owner_hash FROM conversations WHERE id = ?", (cid,)).fetchone()
        assert stored[0] == owner_hash("secret-token") and "secret-token" not in stored[0]
        assert store.owns("secret-token", cid) and not store.owns("secret-tokem", cid)
    finally:
        store.close()


# -- 6. no internals in public replies ------------------------------------------------------------------------


def test_public_replies_carry_no_scores_or_thresholds(live: Live) -> None:
    with live.client("198.51.100.10") as client:
        plain = client.post("/api/chat", json={"message": "What's the weather on Mars?"}).json()
        with client.stream("POST", "/api/chat", json={"message": FAQ_QUESTION, "stream": True}) as stream:
            final = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")][-1]
        v1 = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": FAQ_QUESTION}]}, headers=BEARER
        )
        for body in (plain, final, v1.json()["supportbot"]):
            text = json.dumps(body)
            assert "scores" not in body and "reason" not in body and "threshold" not in text
            assert all("score" not in c for c in body.get("citations", []))
        assert final["citations"] and {"id", "question", "answer"} <= set(final["citations"][0])

        assert client.post("/api/chat", json={"message": FAQ_QUESTION, "debug": True}).status_code == 401
        debug = client.post("/api/chat", json={"message": FAQ_QUESTION, "debug": True}, headers=BEARER).json()
        assert debug["scores"] and debug["reason"] and "score" in debug["citations"][0]


# -- 7. private files -----------------------------------------------------------------------------------------


def test_data_files_are_private(live: Live) -> None:
    data = live.settings.data_dir
    write_data_dir_config(live.settings, {"policy": {"faq_threshold": 0.66}})
    found = [data, *data.rglob("*")]
    names = {p.name for p in found}
    assert {"conversations.sqlite3", "conversations.sqlite3-wal", "supportbot.toml", "kb", "kb.sqlite3"} <= names
    loose = {str(p.relative_to(data.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in found}
    assert {p: m for p, m in loose.items() if int(m, 8) & 0o077} == {}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


# -- in a real browser -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield chromium
        chromium.close()


@pytest.mark.browser
def test_in_a_browser_the_chat_cookie_owns_the_conversation_and_forged_posts_fail(browser: Any, live: Live) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(live.url + "/")
    page.wait_for_selector("#sb-input textarea", timeout=60_000)
    cookie = next(c for c in context.cookies() if c["name"] == CLIENT_COOKIE)
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax" and len(cookie["value"]) >= 43

    before = live.engine.store._conn().execute("SELECT count(*) FROM conversations").fetchone()[0]
    page.locator("#sb-input textarea").fill(FAQ_QUESTION)
    page.locator("#sb-input textarea").press("Enter")
    page.wait_for_function(
        "() => [...document.querySelectorAll(\"#sb-chat [data-testid='bot']\")].some(b => /cancel/i.test(b.innerText))",
        timeout=60_000,
    )
    rows = live.engine.store._conn().execute("SELECT owner_hash FROM conversations ORDER BY rowid").fetchall()
    assert len(rows) == before + 1 and rows[-1][0] == owner_hash(cookie["value"])

    # The console cookie, as the browser keeps it.
    page.goto(live.url + "/admin/")
    page.get_by_label("username").fill("admin")
    page.get_by_label("password").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#sb-entries", timeout=60_000)
    console = [c for c in context.cookies() if c["name"].startswith("access-token")]
    assert console and all(c["sameSite"] == "Lax" and c["httpOnly"] for c in console)

    # Another site (localhost is not 127.0.0.1) posts a form to the logged-in console's upload and the API.
    other = f"http://localhost:{live.port}/docs"
    for action in ("/admin/gradio_api/upload", "/api/kb/entries"):
        page.goto(other)
        page.evaluate(
            """(action) => { const f = document.createElement('form'); f.method = 'POST'; f.action = action;
            f.enctype = 'multipart/form-data'; document.body.appendChild(f); f.submit(); }""",
            f"{live.url}{action}",
        )
        page.wait_for_url(f"{live.url}{action}", timeout=30_000)
        assert "CrossSiteRequest" in page.content()
    context.close()


# -- 2. one login throttle (last: it locks the admin account for the rest of the module) --------------------


def test_login_throttle_backs_off_per_client_and_per_account() -> None:
    now = [0.0]
    throttle = LoginThrottle(
        client_free=2, account_free=3, base_s=10, max_s=25, forget_after_s=100, clock=lambda: now[0]
    )
    assert [throttle.failure("a", "admin") for _ in range(2)] == [0.0, 10.0]
    assert throttle.blocked("a") == 10.0 and throttle.blocked("b", "admin") == 0.0
    now[0] = 11
    assert throttle.failure("a", "Admin") == 20.0  # backoff doubles; the account is case-blind
    assert throttle.blocked("b", "admin") == 10.0  # three failures on the account: every client waits
    now[0] = 40
    assert throttle.failure("a", "x") == 25.0  # capped
    throttle.success("a", "x")
    assert throttle.blocked("a") == 0.0
    now[0] = 500
    assert throttle.blocked("b", "admin") == 0.0  # forgotten


@pytest.mark.parametrize("path", ["console", "basic", "bearer"])
def test_every_login_path_is_throttled_per_client(live: Live, path: str) -> None:
    address = {"console": "203.0.113.1", "basic": "203.0.113.2", "bearer": "203.0.113.3"}[path]

    def attempt(client: httpx.Client, right: bool) -> int:
        if path == "console":
            return console_login(client, PASSWORD if right else "wrong").status_code
        headers = (
            (basic() if right else basic("wrong"))
            if path == "basic"
            else (BEARER if right else {"Authorization": "Bearer sb-wrong"})
        )
        return client.get("/api/kb/entries", headers=headers).status_code

    with live.client(address) as client:
        wrong = 400 if path == "console" else 401
        codes = [attempt(client, right=False) for _ in range(CLIENT_FREE_FAILURES)]
        assert codes == [wrong] * CLIENT_FREE_FAILURES
        refused = (
            client.post("/admin/login", data={"username": "admin", "password": "x"}) if path == "console" else None
        )
        right = attempt(client, right=True)
        assert right == 429  # the right credentials too, while the client waits
        if refused is not None:
            assert int(refused.headers["retry-after"]) >= 1
    with live.client("203.0.113.99") as other:
        assert attempt(other, right=True) == 200  # other clients are not affected


def test_an_account_under_attack_from_many_clients_waits(live: Live) -> None:
    for n in range(ACCOUNT_FREE_FAILURES):
        with live.client(f"192.0.2.{n + 1}") as client:
            console_login(client, "wrong") if n % 2 else client.get("/api/kb/entries", headers=basic("wrong"))
    with live.client("192.0.2.200") as fresh:
        assert console_login(fresh).status_code == 429
        assert fresh.get("/api/kb/entries", headers=basic()).status_code == 429
        assert fresh.get("/api/kb/entries", headers=BEARER).status_code == 200  # another account
