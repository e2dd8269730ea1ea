"""Load benchmark of the web server (issue 6): N simulated customers against ``POST /api/chat``.

Starts ``supportbot serve`` in a subprocess on a free loopback port (demo knowledge base, default
models, **rate limiting off**: every simulated user comes from 127.0.0.1, so the per-client limit
would turn the test into a test of the limiter), waits until it answers, then:

1. **Probe**: sends demo queries (``knowledge_base/demo/queries.jsonl``, shuffled, and the FAQ's own
   questions) as streams and sorts them by what the server does with them: answered straight from
   the FAQ (``faq``), or sent to the language model (the stream's first event is not followed by the
   final one; the probe then hangs up, which also stops that generation).
2. **Load**: ``--users`` simulated customers for ``--duration`` seconds. ``--generating-users`` of
   them ask only questions that go to the language model, so generations run the whole time; the
   others ask questions the FAQ answers directly. Each user waits for its answer, "reads" for
   ``--think`` seconds on average (uniform from half to one and a half times that: 1.5-4.5 s by
   default, like Locust's usual ``between(1, 5)``), and asks again. ``--think 1`` is a stress test.
3. **Report**: requests/s, p50/p95/max latency per kind of question and per answer mode, errors.
   Requests still running at the end get ``--grace`` seconds, then are counted as unfinished.

Targets (issue 6, this 2-core CPU): 50 users for 60 s with zero errors, and ``faq`` p95 <= 250 ms
while generations are running.

    python -m benchmarks.load                           # 50 users, 60 s (about 3 min with start-up)
    python -m benchmarks.load --users 20 --duration 20  # quick look
    python -m benchmarks.load --url http://127.0.0.1:7860 --json load.json   # a running server
    # (a running server must have server.rate_limit_per_minute = 0 for this benchmark)

Loopback only: ``--url`` must point at 127.0.0.1, ::1 or localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.common import (
    busy_cpu_seconds,
    foreign_cpu_load,
    percentile,
    print_table,
    process_cpu_seconds,
    wait_for_idle,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "knowledge_base" / "demo"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_USERS = 500
MAX_DURATION_S = 600.0
START_TIMEOUT_S = 600.0


@dataclass
class Result:
    kind: str  # "faq" or "generation": which pool the question came from
    mode: str  # the answer's mode, or "error"
    latency_ms: float
    status: int
    error: str = ""
    generated: bool = False  # the language model ran (its answer may have been replaced)


# ------------------------------------------------------------------------------------------------
# The server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_data_dir(data_dir: Path) -> None:
    """Reuse the converted model of the repository's data dir (saves the 30 s GGUF conversion)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cached = ROOT / "supportbot-data" / "models"
    target = data_dir / "models"
    if cached.is_dir() and not target.exists():
        target.symlink_to(cached, target_is_directory=True)
    # A fresh conversation store per run: the knowledge base and models stay cached.
    for name in ("conversations.sqlite3", "conversations.sqlite3-wal", "conversations.sqlite3-shm"):
        (data_dir / name).unlink(missing_ok=True)


class Server:
    """``supportbot serve`` in a subprocess, rate limiting off, stopped on exit."""

    def __init__(self, data_dir: Path, port: int, extra: list[str]) -> None:
        self.data_dir, self.port = data_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = data_dir / "server.log"
        args = [
            sys.executable,
            "-m",
            "chatbot.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--set",
            "server.rate_limit_per_minute=0",
            *extra,
        ]
        self.log = self.log_path.open("w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        deadline = self.started + timeout
        with httpx.Client(timeout=5) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    if client.get(f"{self.url}/api/health").status_code == 200:
                        return time.perf_counter() - self.started
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise SystemExit(f"the server did not answer within {timeout:.0f} s; see {self.log_path}")

    def cpu_seconds(self) -> float | None:
        try:
            return process_cpu_seconds(self.proc.pid)
        except (OSError, ValueError):
            return None

    def ready_line(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return next((line.strip() for line in text.splitlines() if "is ready" in line), "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------------
# The machine


def _busy_seconds() -> float | None:
    try:
        return busy_cpu_seconds()
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# Questions


def candidate_questions(seed: int) -> list[str]:
    queries = [json.loads(line)["query"] for line in (DEMO / "queries.jsonl").read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    rng.shuffle(queries)
    return queries


def faq_questions() -> list[str]:
    import csv

    with (DEMO / "faq.csv").open(encoding="utf-8", newline="") as fh:
        return [row["question"] for row in csv.DictReader(fh)]


async def _probe_one(client: httpx.AsyncClient, url: str, question: str) -> str:
    """ "faq", "generation" or another mode, reading no further than needed."""
    events: list[dict[str, Any]] = []
    async with client.stream("POST", f"{url}/api/chat", json={"message": question, "stream": True}) as response:
        if response.status_code != 200:
            return "error"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(json.loads(line[6:]))
            if events[-1].get("done"):
                final = events[-1]
                return "generation" if final.get("model") else str(final.get("mode", "error"))
            if len(events) >= 2:  # a second chunk before the end: the model is writing
                return "generation"
    return "error"


async def probe(url: str, seed: int, want_faq: int, want_generation: int, budget_s: float) -> dict[str, list[str]]:
    """Sort demo queries into those the FAQ answers directly and those that go to the model."""
    found: dict[str, list[str]] = defaultdict(list)
    deadline = time.perf_counter() + budget_s
    async with httpx.AsyncClient(timeout=120) as client:
        for question in candidate_questions(seed):
            if time.perf_counter() > deadline:
                break
            if len(found["faq"]) >= want_faq and len(found["generation"]) >= want_generation:
                break
            kind = await _probe_one(client, url, question)
            found[kind].append(question)
    if len(found["faq"]) < want_faq:
        found["faq"] += faq_questions()[: want_faq - len(found["faq"])]
    return dict(found)


# ------------------------------------------------------------------------------------------------
# Load


async def _user(
    client: httpx.AsyncClient,
    url: str,
    kind: str,
    questions: list[str],
    rng: random.Random,
    end: float,
    think: float,
    results: list[Result],
) -> None:
    await asyncio.sleep(rng.uniform(0, think))  # users arrive spread out, not in one burst
    while time.perf_counter() < end:
        question = rng.choice(questions)
        start = time.perf_counter()
        try:
            response = await client.post(f"{url}/api/chat", json={"message": question})
            latency = (time.perf_counter() - start) * 1000
            if response.status_code == 200:
                body = response.json()
                results.append(Result(kind, str(body["mode"]), latency, 200, generated=body.get("model") is not None))
            else:
                results.append(Result(kind, "error", latency, response.status_code, response.text[:200]))
        except httpx.HTTPError as exc:
            latency = (time.perf_counter() - start) * 1000
            results.append(Result(kind, "error", latency, 0, f"{type(exc).__name__}: {exc}"[:200]))
        await asyncio.sleep(rng.uniform(0.5 * think, 1.5 * think))


async def run_load(
    url: str,
    pools: dict[str, list[str]],
    *,
    users: int,
    generating_users: int,
    duration: float,
    think: float,
    grace: float,
    seed: int,
) -> tuple[list[Result], int, float]:
    """Returns the results, the requests unfinished at the deadline, and the measured wall time."""
    results: list[Result] = []
    limits = httpx.Limits(max_connections=users + 8, max_keepalive_connections=users + 8)
    start = time.perf_counter()
    end = start + duration
    async with httpx.AsyncClient(timeout=duration + grace + 30, limits=limits) as client:
        tasks = []
        for i in range(users):
            kind = "generation" if i < generating_users and pools.get("generation") else "faq"
            rng = random.Random(seed * 1000 + i)
            tasks.append(asyncio.create_task(_user(client, url, kind, pools[kind], rng, end, think, results)))
        _done, pending = await asyncio.wait(tasks, timeout=duration + grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return results, len(pending), time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# Report


def summarize(results: list[Result], unfinished: int, wall_s: float, duration: float) -> dict[str, Any]:
    def stats(latencies: list[float]) -> dict[str, float | int]:
        return {
            "n": len(latencies),
            "p50_ms": round(percentile(latencies, 50), 1),
            "p95_ms": round(percentile(latencies, 95), 1),
            "max_ms": round(max(latencies), 1) if latencies else float("nan"),
        }

    ok = [r for r in results if r.mode != "error"]
    by_kind = {kind: stats([r.latency_ms for r in ok if r.kind == kind]) for kind in sorted({r.kind for r in ok})}
    by_mode = {mode: stats([r.latency_ms for r in ok if r.mode == mode]) for mode in sorted({r.mode for r in ok})}
    # The target: answers from the FAQ while the model is busy with other customers' questions.
    faq_only = [r.latency_ms for r in ok if r.mode == "faq" and not r.generated]
    errors = [r for r in results if r.mode == "error"]
    return {
        "requests": len(results),
        "completed": len(ok),
        "requests_per_s": round(len(ok) / duration, 2),
        "wall_s": round(wall_s, 1),
        "errors": len(errors),
        "error_samples": [f"{e.kind} question: {e.status} {e.error}" for e in errors[:5]],
        "error_statuses": dict(Counter(e.status for e in errors)),
        "unfinished_at_deadline": unfinished,
        "by_kind": by_kind,
        "by_mode": by_mode,
        "faq_direct": stats(faq_only),
        "generations_completed": sum(1 for r in ok if r.generated),
    }


def print_report(summary: dict[str, Any]) -> None:
    rows = [[k, v["n"], v["p50_ms"], v["p95_ms"], v["max_ms"]] for k, v in summary["by_kind"].items()]
    print_table(["question kind", "n", "p50 ms", "p95 ms", "max ms"], rows, title="Latency by kind of question")
    rows = [[k, v["n"], v["p50_ms"], v["p95_ms"], v["max_ms"]] for k, v in summary["by_mode"].items()]
    rows.append(["faq (no generation)", *summary["faq_direct"].values()])
    print_table(["answer mode", "n", "p50 ms", "p95 ms", "max ms"], rows, title="Latency by answer mode")
    print(
        f"\n{summary['completed']} answers in {summary['wall_s']} s: {summary['requests_per_s']} requests/s, "
        f"{summary['generations_completed']} generations, {summary['errors']} errors "
        f"{summary['error_statuses'] or ''}, {summary['unfinished_at_deadline']} unfinished at the deadline"
    )
    for sample in summary["error_samples"]:
        print(f"  error: {sample}")


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50, help="simulated customers (default 50)")
    parser.add_argument("--generating-users", type=int, default=5, help="of them, those asking LLM questions")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument(
        "--think", type=float, default=3.0, help="mean seconds a user reads before the next question (default 3)"
    )
    parser.add_argument("--grace", type=float, default=120.0, help="seconds to let running requests finish")
    parser.add_argument("--url", help="a running server on loopback (its rate limiting must be off)")
    parser.add_argument("--data-dir", type=Path, help="server data dir (default: a cached one in the temp dir)")
    parser.add_argument("--set", action="append", default=[], help="extra server setting section.field=value")
    parser.add_argument("--probe-budget", type=float, default=120.0, help="seconds to find questions of each kind")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="wait up to this many seconds for an idle CPU")
    parser.add_argument("--idle-below", type=float, default=0.5, help="cores other processes may use when 'idle'")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    if not 1 <= args.users <= MAX_USERS:
        parser.error(f"--users must be 1-{MAX_USERS}")
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:.0f}] seconds")
    if not 0 <= args.generating_users <= args.users:
        parser.error("--generating-users must be between 0 and --users")
    if args.url and (urlsplit(args.url).hostname or "") not in LOOPBACK:
        parser.error("--url must be on loopback (127.0.0.1, ::1 or localhost)")

    load = foreign_cpu_load(2.0)
    print(f"machine: {os.cpu_count()} cores; before the run: {load or 'load unknown'}")
    server: Server | None = None
    figures: dict[str, Any] = {
        "users": args.users,
        "generating_users": args.generating_users,
        "duration_s": args.duration,
        "think_s": args.think,
        "foreign_cores_before": load.foreign_cores if load else None,
    }
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            data_dir = args.data_dir or Path(tempfile.gettempdir()) / "supportbot-bench-load"
            _prepare_data_dir(data_dir)
            extra = [item for setting in args.set for item in ("--set", setting)]
            server = Server(data_dir, _free_port(), extra)
            print(f"starting supportbot serve (rate limiting off) in {data_dir} ...")
            start_s = server.wait_ready()
            figures["server_start_s"] = round(start_s, 1)
            print(f"server answering after {start_s:.1f} s ({server.ready_line()})")
            url = server.url

        want_generation = 12 if args.generating_users else 0
        print("probing the demo queries ...")
        pools = asyncio.run(probe(url, args.seed, 20, want_generation, args.probe_budget))
        figures["pools"] = {k: len(v) for k, v in pools.items()}
        print(f"  question pools: {figures['pools']}")
        if args.generating_users and not pools.get("generation"):
            print("  warning: no demo query went to the language model; every user asks FAQ questions")

        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle, args.idle_below)
        cpu_before = server.cpu_seconds() if server else None
        busy_before, own_before = _busy_seconds(), time.process_time()
        print(f"load: {args.users} users ({args.generating_users} asking LLM questions) for {args.duration:.0f} s ...")
        results, unfinished, wall = asyncio.run(
            run_load(
                url,
                pools,
                users=args.users,
                generating_users=args.generating_users,
                duration=args.duration,
                think=args.think,
                grace=args.grace,
                seed=args.seed,
            )
        )
        summary = summarize(results, unfinished, wall, args.duration)
        busy_after, own = _busy_seconds(), time.process_time() - own_before
        summary["client_cpu_cores"] = round(own / wall, 2)
        if server and cpu_before is not None:
            cpu_after = server.cpu_seconds()
            if cpu_after is not None:
                summary["server_cpu_cores"] = round((cpu_after - cpu_before) / wall, 2)
                if busy_before is not None and busy_after is not None:
                    foreign = (busy_after - busy_before) - (cpu_after - cpu_before) - own
                    summary["foreign_cpu_cores"] = round(max(foreign, 0.0) / wall, 2)
        figures.update(summary)
        print_report(summary)
        if "server_cpu_cores" in summary:
            print(
                f"CPU during the load, in cores: server {summary['server_cpu_cores']}, "
                f"this client {summary['client_cpu_cores']}, other processes {summary.get('foreign_cpu_cores', '?')}"
            )
        faq_p95 = summary["faq_direct"]["p95_ms"]
        print(
            f"targets: errors {summary['errors']} (want 0); faq p95 {faq_p95} ms (want <= 250) "
            f"with {summary['generations_completed']} generations running alongside"
        )
    finally:
        if server is not None:
            server.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
