"""Start-up (#15 item 8): the port answers at once with a "warming up" page, then the real app."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ui.warmup import WarmingApp


def real_app(started: list[str]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.append("up")
        yield
        started.append("down")

    app = FastAPI(lifespan=lifespan)

    @app.get("/")
    def home() -> dict[str, str]:
        return {"hello": "world"}

    return app


def test_warming_up_then_the_real_app_with_its_lifespan() -> None:
    front = WarmingApp()
    started: list[str] = []
    with TestClient(front) as client:
        page = client.get("/")
        assert page.status_code == 503 and "Warming up" in page.text and page.headers["retry-after"] == "2"
        api = client.post("/api/chat", json={"message": "hi"})
        assert api.status_code == 503 and api.json()["error"] == "starting" and api.json()["fix"]
        front.stage = "building the web pages"
        assert "building the web pages" in client.get("/admin/").text

        front.set_app(real_app(started))
        assert client.get("/").json() == {"hello": "world"}
        assert started == ["up"] and front.ready
    assert started == ["up", "down"]  # the real app's shutdown runs with the server's


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.slow
def test_serve_answers_within_seconds_and_serves_faq_answers_when_ready(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "chatbot.cli", "serve", "--data-dir", str(tmp_path / "data")]
    command += ["--set", f"server.port={port}", "--set", "policy.generation=off"]
    began = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = 0
        while first == 0 and time.monotonic() - began < 60:
            first = _get(f"http://127.0.0.1:{port}/")
            time.sleep(0.1)
        answered_after = time.monotonic() - began
        assert first in (503, 200), "the port never answered"
        status = first
        while status != 200 and time.monotonic() - began < 300:
            time.sleep(0.5)
            status = _get(f"http://127.0.0.1:{port}/admin")
        assert status == 200
        print(f"port answered after {answered_after:.1f} s, ready after {time.monotonic() - began:.1f} s")
    finally:
        process.terminate()
        process.wait(20)
