"""Security probe of the served app (issue 17): the attacks of the issue, repeated, PASS/FAIL each.

Starts ``supportbot serve`` in a subprocess, as a deployer would, on a free loopback port with a
fresh data dir (demo FAQ, the bundled embedder; the language model is pointed at a missing folder
so the start takes seconds: FAQ answers, which the probe asks, need no model). The server believes
``X-Forwarded-*`` from 127.0.0.1, so the probe can speak as many clients, and as a TLS proxy.

1. CORS and CSRF: no ``Origin`` reflected under a public ``Host``; the console cookie
   ``SameSite=Lax`` (``Secure`` behind HTTPS); cross-site writes refused (Basic and cookie).
2. Login throttling: 60 wrong passwords on ``/admin/login``, on Basic, on Bearer; the right one after.
3. One rate limit: ``/api/chat`` until 429, then ``/v1`` and Gradio's ``/gradio_api/call/chat``.
4. Anonymous upload on the public page (``/gradio_api/upload``, ``/gradio_api/file=``).
5. Another client's conversation and feedback, and what the errors reveal.
6. Thresholds and scores in public replies.
7. File modes in the data dir.

    python -m benchmarks.security_probe            # about a minute; exit status 1 if any check fails
    python -m benchmarks.security_probe --keep     # keep the data dir and the server log
    python -m benchmarks.security_probe --server-root ../old-checkout   # the same probe against a baseline

Loopback only. No figure here is a timing: each line is a check with what it saw.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "probe-password-1234"
EVIL = "https://evil.example"
RATE_LIMIT = 10
START_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``supportbot serve`` in a subprocess; its generated API key read from its first-start output."""

    def __init__(self, data_dir: Path, port: int, root: Path = ROOT) -> None:
        from ui.auth import hash_password

        self.data_dir, self.url = data_dir, f"http://127.0.0.1:{port}"
        self.log_path = data_dir.parent / "server.log"
        settings = {
            "server.admin_password_hash": hash_password(PASSWORD),
            "server.rate_limit_per_minute": str(RATE_LIMIT),
            "server.trusted_proxies": "127.0.0.1",
            "model.model": str(data_dir.parent / "no-model"),  # FAQ answers only: a start in seconds
        }
        args = [sys.executable, "-m", "chatbot.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)]
        for key, value in settings.items():
            args += ["--set", f"{key}={value}"]
        self.log = self.log_path.open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen(args, cwd=root, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> float:
        began = time.perf_counter()
        with httpx.Client(timeout=5) as client:
            while time.perf_counter() - began < START_TIMEOUT_S:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    if client.get(f"{self.url}/api/health").status_code == 200 and "is ready" in self.output():
                        return time.perf_counter() - began
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise SystemExit(f"the server did not answer within {START_TIMEOUT_S:.0f} s; see {self.log_path}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def api_key(self) -> str:
        line = next(line for line in self.output().splitlines() if line.startswith("API key"))
        return line.split(": ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Probe:
    def __init__(self, url: str, api_key: str) -> None:
        self.url, self.api_key = url, api_key
        self.results: list[tuple[str, bool, str]] = []
        self._client_n = 0

    def client(self, **headers: str) -> httpx.Client:
        """A fresh client address (X-Forwarded-For through the trusted proxy 127.0.0.1)."""
        self._client_n += 1
        address = f"198.18.{self._client_n // 250}.{self._client_n % 250 + 1}"
        return httpx.Client(base_url=self.url, headers={"X-Forwarded-For": address, **headers}, timeout=60)

    def check(self, item: str, ok: bool, detail: str) -> None:
        self.results.append((item, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {item}: {detail}", flush=True)

    def run(self, item: str, test: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = test()
        except Exception as exc:  # a probe that crashes is a failed check, with the reason
            ok, detail = False, f"probe error: {type(exc).__name__}: {exc}"
        self.check(item, ok, detail)

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def basic(password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}


def gradio_chat(client: httpx.Client, message: str) -> str:
    """``/gradio_api/call/chat``: the last SSE event's name (complete or error)."""
    started = client.post("/gradio_api/call/chat", json={"data": [message, []]})
    if started.status_code != 200:
        return f"HTTP {started.status_code}"
    event = ""
    with client.stream("GET", f"/gradio_api/call/chat/{started.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
    return event


# -- the checks ---------------------------------------------------------------------------------


def cors(p: Probe) -> tuple[bool, str]:
    headers = {"Host": "support.example.com", "Origin": EVIL, "Access-Control-Request-Method": "DELETE"}
    seen = {}
    with p.client(**headers) as c:
        for method, path in (("GET", "/admin/config"), ("GET", "/config"), ("OPTIONS", "/api/kb/entries/x")):
            seen[f"{method} {path}"] = c.request(method, path).headers.get("access-control-allow-origin")
    reflected = {k: v for k, v in seen.items() if v}
    return not reflected, f"Access-Control-Allow-Origin for {EVIL}: {reflected or 'none'} on {', '.join(seen)}"


def cookie(p: Probe) -> tuple[bool, str]:
    out = {}
    for label, extra in (("http", {}), ("https proxy", {"X-Forwarded-Proto": "https"})):
        with p.client(**extra) as c:
            r = c.post("/admin/login", data={"username": "admin", "password": PASSWORD})
        cookies = [x for x in r.headers.get_list("set-cookie") if x.startswith("access-token")]
        attrs = [{a.strip().lower() for a in x.split(";")} for x in cookies]
        out[label] = (r.status_code, [("samesite=lax" in a, "secure" in a) for a in attrs])
    ok = (
        out["http"][0] == 200
        and all(lax and not secure for lax, secure in out["http"][1])
        and all(lax and secure for lax, secure in out["https proxy"][1])
        and bool(out["http"][1])
        and bool(out["https proxy"][1])
    )
    return ok, f"(status, [(SameSite=Lax, Secure)]) {out}"


def cross_site(p: Probe) -> tuple[bool, str]:
    files = {"file": ("faq.csv", b"question,answer\nIs this forged?,Yes it is.\n", "text/csv")}
    with p.client() as c:
        upload = c.post("/api/kb/upload", files=files, headers={**basic(), "Origin": EVIL})
        delete = c.delete("/api/kb/entries/orders-002", headers={**p.bearer, "Sec-Fetch-Site": "cross-site"})
        queue = c.post("/admin/gradio_api/queue/join", json={}, headers={"Origin": EVIL})
        read = c.get("/api/kb/entries", headers={**basic(), "Sec-Fetch-Site": "cross-site"})
        stored = c.get("/api/kb/search", params={"q": "Is this forged?"}, headers=p.bearer).json()["results"]
        own = c.post("/api/chat", json={"message": "How do I cancel an order?"}, headers={"Origin": p.url})
    codes = [upload.status_code, delete.status_code, queue.status_code, read.status_code]
    forged_stored = any(r["question"] == "Is this forged?" for r in stored)
    ok = codes == [403] * 4 and not forged_stored and own.status_code == 200
    return ok, (
        f"upload+Basic+foreign Origin {codes[0]}, DELETE cross-site {codes[1]}, console queue {codes[2]}, "
        f"Basic read cross-site {codes[3]}; forged entry stored: {forged_stored}; same-origin chat {own.status_code}"
    )


def login_paths(p: Probe) -> tuple[bool, str]:
    out = {}
    for path in ("console form", "Basic", "Bearer"):
        with p.client() as c:

            def attempt(right: bool, c: httpx.Client = c, path: str = path) -> int:
                if path == "console form":
                    data = {"username": "admin", "password": PASSWORD if right else "wrong"}
                    return c.post("/admin/login", data=data).status_code
                if path == "Basic":
                    return c.get("/api/kb/entries", headers=basic(PASSWORD if right else "wrong")).status_code
                key = p.api_key if right else "sb-wrong"
                return c.get("/api/kb/entries", headers={"Authorization": f"Bearer {key}"}).status_code

            codes = [attempt(False) for _ in range(60)]
            refused = sum(code == 429 for code in codes)
            out[path] = (60 - refused, refused, attempt(True))
    ok = all(tried <= 10 and right == 429 for tried, _, right in out.values())
    detail = "; ".join(f"{k}: {a} checked, {b} refused, then the right one -> {r}" for k, (a, b, r) in out.items())
    return ok, detail


def rate_limit(p: Probe) -> tuple[bool, str]:
    with p.client() as c:
        codes = [c.post("/api/chat", json={"message": "How do I cancel an order?"}).status_code for _ in range(12)]
        v1 = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}]}).status_code
        gradio = [gradio_chat(c, "How do I cancel an order?") for _ in range(5)]
    answered_after = gradio.count("complete") + (v1 == 200)
    ok = codes.count(200) == RATE_LIMIT and codes[-1] == 429 and answered_after == 0
    return ok, f"/api/chat {codes.count(200)}x200 then 429; then /v1 -> {v1}, /gradio_api/call/chat -> {gradio}"


def uploads(p: Probe) -> tuple[bool, str]:
    with p.client() as c:
        up = c.post("/gradio_api/upload", files={"files": ("x.html", b"<script>alert(1)</script>", "text/html")})
        get = c.get("/gradio_api/file=/etc/hostname")
        console = c.post("/admin/gradio_api/upload", files={"files": ("x.txt", b"x", "text/plain")})
    ok = up.status_code == 403 and get.status_code == 403 and console.status_code == 401
    return ok, (
        f"public upload {up.status_code}, public file= {get.status_code}, console upload without login "
        f"{console.status_code}"
    )


def isolation(p: Probe) -> tuple[bool, str]:
    with p.client() as alice, p.client() as mallory:
        first = alice.post("/api/chat", json={"message": "Cancel order 4711 for Alice Example"}).json()
        cid, mid = first["conversation_id"], first["message_id"]
        taken = mallory.post("/api/chat", json={"message": "what did I ask?", "conversation_id": cid})
        v1 = mallory.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "what?"}], "conversation_id": cid},
        )
        unknown = mallory.post("/api/chat", json={"message": "hi", "conversation_id": "f" * 32})
        rates = [
            mallory.post("/api/feedback", json={"message_id": m, "rating": "down", "conversation_token": "x"})
            for m in (mid, mid - 1, 10**9)
        ]
        own = alice.post(
            "/api/chat",
            json={"message": "thanks", "conversation_id": cid, "conversation_token": first.get("conversation_token")},
        )
    leaked = "Alice" in taken.text + v1.text
    chat_errors = {(r.status_code, r.json().get("message")) for r in (taken, unknown)}
    rate_errors = {(r.status_code, r.json().get("message", "accepted")) for r in rates}
    ok = (
        taken.status_code == 404
        and v1.status_code == 404
        and not leaked
        and len(chat_errors) == 1
        and len(rate_errors) == 1
        and next(iter(rate_errors))[0] == 404
        and own.status_code == 200
    )
    return ok, (
        f"other's conversation {taken.status_code} (/v1 {v1.status_code}), earlier message echoed: {leaked}; "
        f"errors for other's/unknown id: {sorted(chat_errors)}; feedback on other's answer / a customer "
        f"message / unknown id: {sorted(rate_errors)}; owner continues: {own.status_code}"
    )


def internals(p: Probe) -> tuple[bool, str]:
    with p.client() as c:
        replies = [
            c.post("/api/chat", json={"message": q}).json()
            for q in ("What's the weather on Mars?", "How do I cancel an order?")
        ]
        v1 = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "How do I cancel?"}]})
        replies.append(v1.json().get("supportbot", {}))
        debug_anonymous = c.post("/api/chat", json={"message": "hi", "debug": True}).status_code
    found = [
        k
        for r in replies
        for k in ("reason", "scores", "threshold")
        if k in r or (k == "threshold" and "threshold" in json.dumps(r))
    ]
    found += ["citation score" for r in replies for cit in r.get("citations", []) if "score" in cit]
    ok = not found and debug_anonymous == 401
    return (
        ok,
        f"internals in public replies: {found or 'none'} (keys: {sorted(replies[1])}); debug w/o login: {debug_anonymous}",
    )


def file_modes(data_dir: Path) -> tuple[bool, str]:
    paths = [data_dir, *data_dir.rglob("*")]
    loose = {
        str(path.relative_to(data_dir)): oct(stat.S_IMODE(path.lstat().st_mode))
        for path in paths
        if not path.is_symlink() and stat.S_IMODE(path.lstat().st_mode) & 0o077
    }
    names = sorted(p.name for p in paths if p.name.startswith(("conversations", "admin", "kb")))
    return not loose, f"{len(paths)} paths, readable by others: {loose or 'none'} (checked {', '.join(names)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.security_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the data dir and the server log")
    parser.add_argument(
        "--server-root", type=Path, default=ROOT, help="serve another checkout (e.g. an older one, as a baseline)"
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="supportbot-security-probe-"))
    data_dir = work / "data"
    print(f"starting supportbot serve in {data_dir} (process umask {oct(_umask())}) ...", flush=True)
    server = Server(data_dir, _free_port(), args.server_root.resolve())
    if args.server_root.resolve() != ROOT:
        print(f"serving the checkout at {args.server_root.resolve()}", flush=True)
    try:
        print(f"server ready after {server.wait_ready():.1f} s", flush=True)
        probe = Probe(server.url, server.api_key)
        probe.run("1 CORS: no Origin reflected under a public Host", lambda: cors(probe))
        probe.run("1 console cookie SameSite=Lax, Secure behind HTTPS", lambda: cookie(probe))
        probe.run("1 cross-site writes refused (Basic, cookie, key)", lambda: cross_site(probe))
        probe.run("2 every login path throttled", lambda: login_paths(probe))
        probe.run("3 one rate limit on every route to the engine", lambda: rate_limit(probe))
        probe.run("4 no anonymous upload", lambda: uploads(probe))
        probe.run("5 conversations and feedback isolated", lambda: isolation(probe))
        probe.run("6 no thresholds or scores in public replies", lambda: internals(probe))
        probe.run("7 data files 0600, directories 0700", lambda: file_modes(data_dir))
    finally:
        server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [item for item, ok, _ in probe.results if not ok]
    print(
        f"\n{len(probe.results) - len(failed)}/{len(probe.results)} checks pass"
        + (f"; FAILED: {failed}" if failed else "")
    )
    return 1 if failed else 0


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


if __name__ == "__main__":
    sys.exit(main())
