"""Section 7 of ``benchmarks/chat.py``: answer latency at the shipped thread defaults, with and without
a busy neighbour process (#15 item 9).

Each measurement runs in a fresh child process (so its torch threads are what a real start gives:
``OMP_NUM_THREADS`` is removed from its environment) that opens the demo knowledge base with the real
MiniLM embedder, generation off (the CPU default), and answers 60 demo questions after a warm-up:

* **torch default** (``runtime.threads`` never applied: one thread per core; what a default install
  did before #15) vs **shipped default** (``chatbot.runtime.apply_threads`` as ``supportbot serve``
  does: 1 thread);
* each **alone** (other processes on the machine still count: see the foreign load printed) and
  **with a busy neighbour**: one ``python -c 'while 1: pass'`` process per core.

The figures are ``faq`` / ``clarify`` / ``handoff`` answer latencies (ms, ``Answer.latency_ms``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import percentile, print_table

N_QUESTIONS = 60


def _child(data_dir: Path, shipped: bool) -> dict[str, Any]:
    import torch

    from benchmarks.chat import TopEntryGenerator, demo_rows
    from chatbot.runtime import apply_threads
    from chatbot.services import build_engine
    from chatbot.settings import load_settings

    settings = load_settings(env={}, overrides={"data_dir": str(data_dir), "policy.generation": "off"})
    if shipped:
        apply_threads(settings, serving=True, env={})
    engine = build_engine(settings, generator=TopEntryGenerator())
    rows = (demo_rows("queries.jsonl", "test") + demo_rows("queries.jsonl", "dev"))[:N_QUESTIONS]
    for row in rows[:5]:
        engine.answer(str(row["query"]), client="bench")
    latencies: list[float] = []
    modes: dict[str, int] = {}
    for row in rows:
        answer = engine.answer(str(row["query"]), client="bench")
        latencies.append(answer.latency_ms)
        modes[answer.mode] = modes.get(answer.mode, 0) + 1
    engine.store.close()
    engine.kb.close()
    return {
        "torch_threads": torch.get_num_threads(),
        "n": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
        "max_ms": round(max(latencies), 1),
        "modes": modes,
    }


def _run_child(data_dir: Path, shipped: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    args = [sys.executable, "-m", "benchmarks.busy_neighbour", "--child", str(data_dir)]
    out = subprocess.run(
        [*args, *(["--shipped"] if shipped else [])], env=env, capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def measure(data_dir: Path, *, say: Any = print) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for busy in (False, True):
        spinners = []
        if busy:
            spinners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(os.cpu_count() or 1)]
            time.sleep(1.0)
        try:
            for shipped in (False, True):
                key = f"{'shipped' if shipped else 'torch default'}, {'busy neighbour' if busy else 'alone'}"
                say(f"  {key}...")
                results[key] = {**_run_child(data_dir, shipped), "load_1min": _load()}
        finally:
            for process in spinners:
                process.kill()
                process.wait()
    return results


def section_busy(bench: Any) -> None:
    from benchmarks.chat import DEMO_DIR, log, report_load

    print("\n== 7. Thread defaults under load: faq/clarify/hand-off latency, fresh processes ==")
    report_load("section 7 start", bench.results)
    data_dir = bench.kb_dir("demo", [DEMO_DIR / "faq.csv"])
    results = measure(data_dir, say=log)
    rows = [
        [k, r["torch_threads"], r["n"], r["p50_ms"], r["p95_ms"], r["max_ms"], r["load_1min"]]
        for k, r in results.items()
    ]
    print_table(
        ["threads", "torch threads", "n", "p50 ms", "p95 ms", "max ms", "load (1 min)"],
        rows,
        title="Answers without the LLM (target: p95 <= 60 ms at the shipped default with a busy neighbour)",
    )
    bench.results["busy_neighbour"] = results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", type=Path, required=True)
    parser.add_argument("--shipped", action="store_true")
    args = parser.parse_args()
    print(json.dumps(_child(args.child, args.shipped)))


if __name__ == "__main__":
    main()
