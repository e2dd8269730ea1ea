"""Every address the app prints (the start-up banner, README.md, docs/web.md) answers.

A support lead types what the banner says: ``/admin`` without the slash must reach the console
(a redirect to ``/admin/``), not ``{"detail": "Not Found"}``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import HashingEmbedder
from fastapi.testclient import TestClient

from chatbot.services import build_engine, demo_file
from chatbot.settings import load_settings
from ui.auth import Auth
from ui.server import banner_lines, create_app

ROOT = Path(__file__).resolve().parents[1]
BASE = "http://testserver"
pytestmark = [
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function BaseEventLoop.__del__:pytest.PytestUnraisableExceptionWarning"
    ),
]


def printed_paths() -> set[str]:
    """The GET-able paths in the banner and the user-facing docs (``/api/...`` routes need a body)."""
    paths = {
        re.sub(r"^https?://[^/]+", "", u) or "/" for u in re.findall(r"https?://\S+", " ".join(banner_lines(BASE)))
    }
    readme = (ROOT / "README.md").read_text()
    paths |= set(re.findall(r"\(console: (/\w+)\)", readme))
    web_line = next(line for line in readme.splitlines() if line.startswith("- **Web app**"))
    paths |= {p for p in re.findall(r"`(/[\w/]*)`", web_line) if p not in ("/api", "/v1")}
    table = (ROOT / "docs" / "web.md").read_text()
    paths |= {p for p in re.findall(r"^\| `(/[\w/]*)` \|", table, re.M)}
    return paths


def test_the_printed_paths_are_found() -> None:
    assert {"/", "/admin", "/docs"} <= printed_paths()


def test_every_printed_url_answers(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path / "data")})
    engine = build_engine(settings, embedder=HashingEmbedder())
    engine.kb.add_files([demo_file()])
    app = create_app(settings, engine, auth=Auth(settings, announce=lambda _text: None, iterations=1000))
    try:
        with TestClient(app) as client:
            for path in sorted(printed_paths()):
                response = client.get(path)
                assert response.status_code == 200, f"{path} -> {response.status_code} {response.text[:200]}"
            moved = client.get("/admin", follow_redirects=False)
            assert moved.status_code in (307, 308) and moved.headers["location"] == "/admin/"
    finally:
        engine.store.close()
        engine.kb.close()
