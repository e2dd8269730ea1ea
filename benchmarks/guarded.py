"""Section 6 of ``benchmarks/chat.py``: guarded streaming and ``policy.generation`` (#15 item 2).

On demo queries the policy sends to the LLM, with the real SmolLM2-135M on this CPU:

* **time to the first visible word** when sentences are released one by one after the guard
  (what the engine does) against showing a typing indicator until the whole draft passes (the
  time the ``done`` event arrives), both from the same stream in the same run;
* how each answer ended (``generated`` / the FAQ entry / hand-off) with generation on;
* the same questions with generation off ("did you mean" with the relevant entries, the CPU
  default of ``policy.generation = "auto"``): latency and mode.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from benchmarks.common import percentile, print_table


def section_guarded(bench: Any) -> None:
    from benchmarks.chat import DEMO_DIR, generated_queries, log, report_load, set_threads

    print("\n== 6. Guarded streaming and policy.generation (real SmolLM2-135M, this CPU) ==")
    set_threads(bench.args.gen_threads)
    report_load("section 6 start", bench.results)
    settings = bench.settings(bench.kb_dir("demo", [DEMO_DIR / "faq.csv"]))
    engine = bench.engine(settings, generator=bench.generator(settings))
    off = bench.engine(settings.replace(policy={"generation": "off"}), kb=engine.kb)
    prompts = generated_queries(bench, engine, bench.args.generated_limit)
    rows, first_s, whole_s, off_ms = [], [], [], []
    modes: Counter[str] = Counter()
    for i, (row, _hits) in enumerate(prompts):
        query = str(row["query"])
        start = time.perf_counter()
        first = None
        final = None
        for event in engine.answer_stream(query, client="bench"):
            if event.kind == "delta" and event.text and first is None:
                first = time.perf_counter() - start
            elif event.kind == "done":
                final = event.answer
        whole = time.perf_counter() - start
        assert final is not None and first is not None
        alt = off.answer(query, client="bench")
        modes[final.mode] += 1
        first_s.append(first)
        whole_s.append(whole)
        off_ms.append(alt.latency_ms)
        rows.append([query[:48], final.mode, f"{first:.1f}", f"{whole:.1f}", alt.mode, f"{alt.latency_ms:.0f}"])
        log(f"  [{i + 1}/{len(prompts)}] {final.mode}: first word {first:.1f} s, whole {whole:.1f} s")
    if not rows:
        print("no demo query is sent to the LLM with these thresholds; nothing to measure")
        return
    print_table(
        ["query", "mode (on)", "first word s", "whole s", "mode (off)", "off ms"],
        rows,
        title="Each question: sentence-by-sentence release vs typing indicator until the whole draft passes",
    )
    summary = {
        "n": len(rows),
        "first_visible_word_sentences_p50_s": round(percentile(first_s, 50), 2),
        "first_visible_word_sentences_max_s": round(max(first_s), 2),
        "first_visible_word_whole_answer_p50_s": round(percentile(whole_s, 50), 2),
        "first_visible_word_whole_answer_max_s": round(max(whole_s), 2),
        "ended_as": dict(modes),
        "generation_off_latency_p50_ms": round(percentile(off_ms, 50), 1),
        "generation_off_latency_max_ms": round(max(off_ms), 1),
    }
    print_table(
        ["figure", "value"],
        [[k, v] for k, v in summary.items()],
        title="Summary (first visible word: sentence by sentence vs whole answer; generation off)",
    )
    report_load("section 6 end", bench.results)
    bench.results["guarded"] = summary
