"""Retrieval benchmark: ranking quality, query latency, ingestion and edit speed of the knowledge base.

For each dev set (StackFAQ, COVID-QA from ``../shared/data``, and the bundled demo) it prints
P@1 / hit@5 / MRR@10, query latency p50/p95 and ingestion throughput for BM25 alone, dense alone
and the shipped (hybrid) ranking, each also as a ratio to BM25 measured in the same run. On
10,000 synthetic short entries it measures query latency and how fast a single edit becomes
searchable; ``--scale`` adds 100,000 entries in a subprocess (ingestion, disk size, peak RSS,
query p95). The issue's targets are printed with PASS/MISS.

    python -m benchmarks.retrieval                  # dev sets + 10k: ~6 CPU minutes (longer when shared)
    python -m benchmarks.retrieval --scale --json benchmarks/results/retrieval.json
    python -m benchmarks.retrieval --scale-only     # only the 100k run (~45 CPU minutes, mostly embedding)
    python -m benchmarks.retrieval --scale-only --instant-entries   # 100k latency, disk, RSS in minutes

Every KB is built in a temporary folder with the real default embedder (MiniLM), loaded once.
Latency is measured with ``k=10`` (the metrics need ten results; the bot asks for five, which is
slightly cheaper) and one torch thread by default: see `benchmarks.common`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    GIB,
    Timer,
    foreign_cpu_load,
    format_bytes,
    peak_rss_bytes,
    percentile,
    print_table,
    run_measured,
    set_torch_threads,
)
from knowledge_base.embeddings import Embedder, make_embedder
from knowledge_base.evaluate import read_jsonl, relevant_ids, retrieval_metrics
from knowledge_base.index import LexicalIndex
from knowledge_base.kb import KnowledgeBase
from knowledge_base.loaders import load_faq_file
from knowledge_base.settings import KBSettings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
DEMO_DIR = REPO / "knowledge_base" / "demo"
MODES = ("bm25", "dense", "hybrid")
MODE_TITLES = {"bm25": "BM25", "dense": "dense", "hybrid": "hybrid (shipped)"}
K = 10
FILE_ENTRIES = 10_000
"""Synthetic entries per upload file (100,000 in one file would pass the default 20 MB upload limit)."""


@dataclass(frozen=True)
class DevSet:
    name: str
    faq: Path
    queries: Path


def dev_sets(data_dir: Path) -> list[DevSet]:
    return [
        DevSet("StackFAQ", data_dir / "stackfaq" / "faq.jsonl", data_dir / "stackfaq" / "queries.jsonl"),
        DevSet("COVID-QA", data_dir / "covidqa-deepset" / "faq.jsonl", data_dir / "covidqa-deepset" / "queries.jsonl"),
        DevSet("demo", DEMO_DIR / "faq.csv", DEMO_DIR / "queries.jsonl"),
    ]


# -- synthetic short FAQ entries ------------------------------------------------------------------
def _words(text: str) -> list[str]:
    """Vocabulary written as prose (a hyphen joins a multi-word item); easier to read than list literals."""
    return text.split()


PRODUCTS = _words("""jacket hoodie sneakers backpack headphones smartwatch blender kettle lamp desk chair sofa rug
mattress pillow duvet towel frying-pan knife-set coffee-maker toaster vacuum air-purifier fan heater
tent sleeping-bag bicycle helmet yoga-mat dumbbells treadmill phone-case charger power-bank speaker
tablet keyboard mouse monitor webcam router printer camera tripod drone watch sunglasses wallet
handbag scarf gloves boots sandals dress shirt jeans raincoat umbrella suitcase stroller car-seat
crib high-chair toy-kit puzzle board-game guitar""")
BRANDS = _words("""Northwind Alder Brightline Corvo Dunmore Elmstead Fernhill Glenrock Harbor Islay Juniper Kestrel
Larkspur Meridian Nimbus Oakley&Co Pinecrest Quarry Redwood Saltmarsh Thornbury Umber Vale Westward
Yarrow Zephyr Ashgrove Birchwood Cobalt Driftwood""")
COLORS = _words("black white navy red green olive grey beige pink teal mustard burgundy charcoal cream sky-blue")
COUNTRIES = _words("""Ireland France Germany Spain Italy Portugal Austria Belgium the-Netherlands Denmark Sweden Norway
Finland Poland Czechia Hungary Greece Croatia Slovenia Romania Bulgaria Estonia Latvia Lithuania Iceland
Switzerland the-UK the-US Canada Mexico Brazil Japan South-Korea Australia New-Zealand Singapore
India Israel Turkey Morocco""")
PAYMENTS = _words("Visa Mastercard PayPal Apple-Pay Google-Pay Klarna a-gift-card bank-transfer Amex iDEAL")
ACCOUNT_FIELDS = ["email address", "phone number", "delivery address", "billing address", "password", "display name"]
ISSUES = ["arrived damaged", "is missing a part", "stopped working", "is the wrong size", "looks different"]

QUESTION_TEMPLATES: list[tuple[str, str, str]] = [
    (
        "returns",
        "Can I return the {color} {brand} {product} {code} after {days} days?",
        "Yes. Unused items can be returned within {limit} days; start the return from Orders > Return an item.",
    ),
    (
        "returns",
        "My {brand} {product} {code} {issue}, what should I do?",
        "Sorry about that. Send us a photo within {limit} days and we replace the {product} or refund it in full.",
    ),
    (
        "shipping",
        "Do you ship the {brand} {product} {code} to {country}?",
        "Yes, the {product} ships to {country} in {lo}-{hi} business days; shipping is free over {amount} EUR.",
    ),
    (
        "shipping",
        "How long does delivery of a {color} {product} {code} to {country} take?",
        "Orders to {country} usually arrive in {lo}-{hi} business days after dispatch; you get a tracking link.",
    ),
    (
        "payments",
        "Can I pay for the {brand} {product} {code} with {payment}?",
        "Yes, we accept {payment} for every order, including the {product}; you are charged when it ships.",
    ),
    (
        "payments",
        "Why was my {payment} payment for order {order} declined?",
        "Your bank declined order {order}; check the card limit or try another method within {limit} hours.",
    ),
    (
        "products",
        "Is the {color} {brand} {product} {code} back in stock?",
        "The {color} {product} is restocked about every {limit} days; tap Notify me to get an email.",
    ),
    (
        "products",
        "What warranty comes with the {brand} {product} {code}?",
        "The {brand} {product} has a {years}-year warranty; keep your order number {order} as proof of purchase.",
    ),
    (
        "orders",
        "Where is my order {order} with the {product}?",
        "Open Orders and select {order} to see its status; parcels to {country} take {lo}-{hi} days.",
    ),
    (
        "orders",
        "Can I change the size of the {product} in order {order}?",
        "Yes, while order {order} is not yet packed; after that, return the {product} and order the new size.",
    ),
    (
        "account",
        "How do I change the {field} on my account {code}?",
        "Go to Account > Settings and edit your {field}; the change takes effect within {limit} minutes.",
    ),
    (
        "privacy",
        "How do I delete the {field} you store for customer {code}?",
        "Write to privacy@example.com from your account email; we erase your {field} within {limit} days.",
    ),
]
QUERY_PREFIXES = ["", "", "hi, ", "quick question: ", "hello - ", "hey "]


def synthetic_entries(n: int, *, seed: int = 1234) -> list[dict[str, str]]:
    """``n`` distinct short FAQ entries of a fictional store, the same for the same seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    while len(out) < n:
        category, question, answer = rng.choice(QUESTION_TEMPLATES)
        lo = rng.randint(1, 6)
        slots = {
            "product": rng.choice(PRODUCTS),
            "brand": rng.choice(BRANDS),
            "color": rng.choice(COLORS),
            "country": rng.choice(COUNTRIES),
            "payment": rng.choice(PAYMENTS),
            "field": rng.choice(ACCOUNT_FIELDS),
            "issue": rng.choice(ISSUES),
            "code": f"{rng.choice('ABCDEFGHKLMNPRSTVXZ')}{rng.randint(100, 9999)}",
            "order": f"#{rng.randint(100000, 999999)}",
            "days": str(rng.randint(2, 90)),
            "limit": str(rng.choice([7, 14, 30, 48, 60])),
            "lo": str(lo),
            "hi": str(lo + rng.randint(1, 5)),
            "amount": str(rng.choice([30, 50, 75, 100])),
            "years": str(rng.randint(1, 5)),
        }
        slots = {k: v.replace("-", " ") for k, v in slots.items()}  # "sky-blue" is one word in the lists
        q = question.format(**slots)
        if q in seen:
            continue
        seen.add(q)
        out.append({"id": f"syn-{len(out):06d}", "question": q, "answer": answer.format(**slots), "category": category})
    return out


def synthetic_queries(entries: Sequence[dict[str, str]], n: int, *, seed: int = 99) -> list[dict[str, str]]:
    """Customer-like wordings of ``n`` random entries (lower case, no question mark, a greeting)."""
    rng = random.Random(seed)
    rows = []
    for entry in rng.sample(list(entries), min(n, len(entries))):
        text = entry["question"].rstrip("?")
        text = text.lower() if rng.random() < 0.5 else text
        rows.append({"query": rng.choice(QUERY_PREFIXES) + text, "faq_id": entry["id"]})
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# -- measurements ---------------------------------------------------------------------------------
class Progress:
    """KB progress callback: prints about every 10% of a long build to stderr, and remembers when
    the embedding stage ended, which splits an upload's time into embedding and the rest."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.perf_counter()
        self.embedded_at: float | None = None
        self._next = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage == "embedding" and done == total:
            self.embedded_at = now
        if total >= 1000 and (done / total >= self._next or done == total):
            rate = done / max(now - self.start, 1e-9)
            print(f"  {self.label}: {stage} {done}/{total} ({rate:.0f}/s)", file=sys.stderr, flush=True)
            self._next = done / total + 0.1


def bm25_ingest(files: Sequence[Path], settings: KBSettings, directory: Path) -> dict[str, float]:
    """The BM25-only baseline: read and validate the files, build the BM25 index, save it."""
    with Timer() as timer:
        entries = [e for path in files for e in load_faq_file(path, settings).entries]
        index = LexicalIndex()
        for entry in entries:
            index.add(entry.id, "\n".join([*entry.questions, entry.answer]))  # as KnowledgeBase indexes it
        index.save(directory / "bm25-only.json", revision=0)
    n = len(entries)
    return {
        "entries": n,
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "entries_per_s": n / timer.seconds,
    }


def kb_ingest(
    files: Sequence[Path], settings: KBSettings, embedder: Embedder, directory: Path, *, label: str
) -> tuple[KnowledgeBase, dict[str, float | None]]:
    """A fresh KB in ``directory`` with ``files`` uploaded at once: the timed call is `KnowledgeBase.add_files`."""
    progress = Progress(label)
    kb = KnowledgeBase(directory, settings, embedder, progress=progress)
    progress.start = time.perf_counter()
    with Timer() as timer:
        report = kb.add_files(files)
        searchable = time.perf_counter() - progress.start
        after = time.perf_counter() - progress.embedded_at if progress.embedded_at else None
        kb.wait_for_answers()  # large uploads: the whole-entry vectors, embedded in the background
    n = report.added
    return kb, {
        "entries": n,
        "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "entries_per_s": n / timer.seconds,  # until complete, background vectors included
        "entries_per_cpu_s": n / max(timer.cpu_seconds, 1e-9),
        "searchable_s": searchable,
        "searchable_entries_per_s": n / searchable,  # until add_files returned: searchable by every phrasing
        "background_answers": report.answers_pending,
        "after_embedding_s": after,  # FAISS add, BM25, saving both: everything but loading and embedding
    }


def _latency(wall_ms: Sequence[float], cpu_ms: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(wall_ms, 50),
        "p95_ms": percentile(wall_ms, 95),
        "max_ms": max(wall_ms),
        "cpu_p50_ms": percentile(cpu_ms, 50),
        "cpu_p95_ms": percentile(cpu_ms, 95),
    }


def run_queries(kb: KnowledgeBase, rows: Sequence[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Metrics and per-query latency (wall and CPU ms) of one ranking mode over labelled ``rows``."""
    wall: list[float] = []
    cpu: list[float] = []

    def ranked(query: str) -> list[str]:
        with Timer() as timer:
            hits = kb.search(query, K, mode=mode)
        wall.append(timer.seconds * 1000)
        cpu.append(timer.cpu_seconds * 1000)
        return [h.entry.id for h in hits]

    metrics = retrieval_metrics(rows, ranked)["overall"]
    return {**metrics, **_latency(wall, cpu)}


def labelled_sources(faq: Path, rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]] | None:
    """(the sources, the FAQ rows from them) when every labelled entry comes from some of the FAQ's
    ``source`` values but not all; None otherwise (no ``source`` field, not JSONL, or labels everywhere).

    COVID-QA merges FAQs of five agencies that ask many of the same questions, but its labels all
    point at CDC entries: a WHO entry asking the very question of the query counts as a miss. P@1
    over the labelled sources alone separates that from ranking errors."""
    if faq.suffix != ".jsonl":
        return None
    entries = read_jsonl(faq, require=("id",))
    source_of = {str(e["id"]): e.get("source") for e in entries}
    if None in source_of.values():
        return None
    labelled = {source_of[i] for row in rows for i in relevant_ids(row) if i in source_of}
    if not labelled or labelled == set(source_of.values()):
        return None
    return sorted(labelled), [e for e in entries if e["source"] in labelled]


def bench_dev_set(ds: DevSet, settings: KBSettings, embedder: Embedder) -> dict[str, Any]:
    rows = [r for r in read_jsonl(ds.queries, require=("query",)) if relevant_ids(r)]
    scope = labelled_sources(ds.faq, rows)
    with tempfile.TemporaryDirectory(prefix="supportbot-bench-") as tmp:
        baseline = bm25_ingest([ds.faq], settings, Path(tmp))
        kb, ingest = kb_ingest([ds.faq], settings, embedder, Path(tmp) / "kb", label=ds.name)
        try:
            modes = {mode: run_queries(kb, rows, mode) for mode in MODES}
        finally:
            kb.close()
        result = {
            "entries": ingest["entries"],
            "queries": len(rows),
            "modes": modes,
            "ingest": {"bm25": baseline, "kb": ingest},
        }
        if scope:
            sources, kept = scope
            write_jsonl(Path(tmp) / "scoped.jsonl", kept)
            scoped, _ = kb_ingest(
                [Path(tmp) / "scoped.jsonl"], settings, embedder, Path(tmp) / "scoped", label=f"{ds.name} scoped"
            )
            try:
                metrics = {mode: run_queries(scoped, rows, mode) for mode in MODES}
            finally:
                scoped.close()
            result["label_scope"] = {"sources": sources, "entries": len(kept), "modes": metrics}
    return result


def print_label_scope(result: dict[str, Any]) -> None:
    scope = result.get("label_scope")
    if not scope:
        return
    rows = _mode_rows(scope["modes"], METRIC_ROWS)
    title = (
        f"same queries, KB restricted to the {scope['entries']} of {result['entries']} entries from the "
        f"source(s) every label points into ({', '.join(s[:40] for s in scope['sources'])})"
    )
    print_table(["", *(MODE_TITLES[m] for m in MODES)], rows, title=title)
    print("(diagnostic: entries of other sources asking the same question count as misses above)")


def edit_latency(kb: KnowledgeBase, ids: Sequence[str], *, seed: int = 7) -> dict[str, Any]:
    """Time ``kb.update`` of one entry plus a search that finds its new wording, per edit (ms)."""
    rng = random.Random(seed)
    update_ms, wall, cpu, found = [], [], [], 0
    for n, entry_id in enumerate(rng.sample(list(ids), len(ids))):
        product, country = rng.choice(PRODUCTS).replace("-", " "), rng.choice(COUNTRIES).replace("-", " ")
        question = f"Is express delivery of the {product} to {country} possible with code EDIT{n:03d}{seed}?"
        with Timer() as whole:
            with Timer() as update:
                kb.update(entry_id, question=question, answer=f"Yes: express delivery to {country} takes 2 days.")
            hits = kb.search(question, 5)
        found += bool(hits) and hits[0].entry.id == entry_id
        update_ms.append(update.seconds * 1000)
        wall.append(whole.seconds * 1000)
        cpu.append(whole.cpu_seconds * 1000)
    return {
        "edits": len(ids),
        "found_at_1": found,
        "update_p50_ms": percentile(update_ms, 50),
        **_latency(wall, cpu),
        **searches_during_save(kb, ids[0]),
    }


def searches_during_save(kb: KnowledgeBase, entry_id: str, *, saves: int = 3) -> dict[str, float]:
    """Single edits rewrite the index files in the background. Time that save, and searches sent
    while it runs (they share the indexes with it and should not wait); baseline: the same
    searches with no save running."""
    question = kb.get(entry_id).question
    save_ms, during, idle = [], [], []
    for n in range(saves):
        for _ in range(5):
            with Timer() as t:
                kb.search(question, 5)
            idle.append(t.seconds * 1000)
        kb.update(entry_id, answer=f"Yes: express delivery takes {n + 3} days.")
        started = time.perf_counter()
        saver = threading.Thread(target=kb.flush)
        saver.start()
        while saver.is_alive():
            with Timer() as t:
                kb.search(question, 5)
            during.append(t.seconds * 1000)
        saver.join()
        save_ms.append((time.perf_counter() - started) * 1000)
    return {
        "save_ms": percentile(save_ms, 50),
        "search_during_save_p95_ms": percentile(during, 95),
        "search_during_save_max_ms": max(during),
        "searches_during_save": len(during),
        "search_idle_p95_ms": percentile(idle, 95),
    }


def bench_synthetic(
    n: int, settings: KBSettings, embedder: Embedder, *, queries: int = 200, edits: int = 20
) -> dict[str, Any]:
    """A KB of ``n`` synthetic short entries: ingestion, query latency per mode, edit latency, disk."""
    entries = synthetic_entries(n)
    rows = synthetic_queries(entries, queries)
    with tempfile.TemporaryDirectory(prefix="supportbot-bench-") as tmp:
        files = []
        for start in range(0, n, FILE_ENTRIES):
            files.append(Path(tmp) / f"synthetic-{start // FILE_ENTRIES:03d}.jsonl")
            write_jsonl(files[-1], entries[start : start + FILE_ENTRIES])
        baseline = bm25_ingest(files, settings, Path(tmp))
        kb, ingest = kb_ingest(files, settings, embedder, Path(tmp) / "kb", label=f"{n} synthetic")
        try:
            stats = kb.stats()
            modes = {mode: run_queries(kb, rows, mode) for mode in MODES}
            edit = edit_latency(kb, [e["id"] for e in entries[:: max(n // edits, 1)][:edits]])
        finally:
            kb.close()
    return {
        "entries": n,
        "queries": len(rows),
        "modes": modes,
        "ingest": {"bm25": baseline, "kb": ingest},
        "edit": edit,
        "disk_bytes": stats["disk_bytes"],
        "vectors": stats["vectors"],
    }


class InstantEntries(Embedder):
    """The real embedder for queries (``embed_batch``), instant pseudo-random unit vectors for
    uploads and edits (``embed``): a 100,000-entry knowledge base in minutes instead of hours, with
    the same index sizes and query costs (exact search costs the same whatever the vectors hold).
    Only latency, disk size and memory mean anything then, not ranking quality."""

    def __init__(self, real: Embedder) -> None:
        self.real, self.name = real, f"{real.name}+instant-entries"

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        return self.real.embed_batch(texts)

    def truncate(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        return self.real.truncate(texts, max_tokens)

    def embed(self, texts: Sequence[str], *, batch_size: int = 64, progress: Any = None) -> np.ndarray:
        rng = np.random.default_rng(len(texts))
        vectors = rng.standard_normal((len(texts), self.real.dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        if progress:
            progress(len(texts), len(texts))
        return vectors


def scale_in_subprocess(n: int, threads: int, settings: KBSettings, *, instant: bool = False) -> dict[str, Any]:
    """`bench_synthetic` at ``n`` entries in a fresh interpreter, so the peak RSS is its own."""
    cmd = [sys.executable, "-m", "benchmarks.retrieval", "--scale-worker", str(n), "--threads", str(threads)]
    cmd += ["--answer-tokens", str(settings.answer_tokens)]
    cmd += ["--instant-entries"] if instant else []
    run = run_measured(cmd, cwd=REPO)
    if run.returncode != 0:
        raise SystemExit(f"the scale run failed (exit {run.returncode})")
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = run.peak_rss_bytes
    result["wall_s"] = run.seconds
    return result


# -- report ---------------------------------------------------------------------------------------
def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


METRIC_ROWS = [("P@1", "p@1", 3), ("hit@5", "hit@5", 3), ("MRR@10", "mrr@10", 3)]
LATENCY_ROWS = [("query p50 ms", "p50_ms", 1), ("query p95 ms", "p95_ms", 1), ("query p95 CPU ms", "cpu_p95_ms", 1)]


def _mode_rows(modes: dict[str, Any], keys: Sequence[tuple[str, str, int]]) -> list[list[object]]:
    """One table row per (label, key, digits): each mode's figure, with its ratio to BM25."""
    base = modes["bm25"]
    return [
        [
            label,
            *(
                f"{modes[m][key]:.{digits}f}" + ("" if m == "bm25" else f" ({_ratio(modes[m][key], base[key])})")
                for m in MODES
            ),
        ]
        for label, key, digits in keys
    ]


def print_modes(title: str, result: dict[str, Any], *, metrics: bool = True) -> None:
    rows = _mode_rows(result["modes"], (METRIC_ROWS if metrics else []) + LATENCY_ROWS)
    bm25_rate, kb_rate = result["ingest"]["bm25"]["entries_per_s"], result["ingest"]["kb"]["entries_per_s"]
    shared = f"{kb_rate:.1f} ({_ratio(kb_rate, bm25_rate)})"
    rows.append(["ingest entries/s", f"{bm25_rate:.0f}", shared, shared])
    bm25_cpu = result["ingest"]["bm25"]["entries"] / max(result["ingest"]["bm25"]["cpu_seconds"], 1e-9)
    kb_cpu = result["ingest"]["kb"]["entries_per_cpu_s"]
    shared = f"{kb_cpu:.1f} ({_ratio(kb_cpu, bm25_cpu)})"
    rows.append(["ingest entries/CPU s", f"{bm25_cpu:.0f}", shared, shared])
    print_table(["", *(MODE_TITLES[m] for m in MODES)], rows, title=title)
    print("(dense and hybrid share one KB, so one ingestion figure; BM25 = load + BM25 index + save)")


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    limit: float
    higher_is_better: bool
    unit: str = ""
    cpu_value: float | None = None
    """The same figure from this process's CPU time: about what an idle machine would show."""

    def _verdict(self, value: float | None) -> str:
        if value is None:
            return "-"
        ok = value >= self.limit if self.higher_is_better else value <= self.limit
        return "PASS" if ok else "MISS"

    def verdict(self) -> str:
        return "not run" if self.value is None else self._verdict(self.value)

    def row(self) -> list[str]:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3g}{self.unit}"

        goal = f"{'>=' if self.higher_is_better else '<='} {self.limit:g}{self.unit}"
        cpu = "" if self.cpu_value is None else f"{fmt(self.cpu_value)} {self._verdict(self.cpu_value)}"
        return [self.name, fmt(self.value), goal, self.verdict(), cpu]


def targets(report: dict[str, Any]) -> list[Target]:
    def get(*path: str) -> float | None:
        node: Any = report
        for key in path:
            if not isinstance(node, dict) or node.get(key) is None:
                return None
            node = node[key]
        return float(node)

    def size(part: str) -> str:
        n = get(part, "entries")
        return f"{n:,.0f}" if n else ("10,000" if part == "synthetic" else "100,000")

    rss = get("scale", "peak_rss_bytes")
    out = [
        Target("StackFAQ P@1 (hybrid)", get("dev_sets", "StackFAQ", "modes", "hybrid", "p@1"), 0.96, True),
        Target("COVID-QA P@1 (hybrid)", get("dev_sets", "COVID-QA", "modes", "hybrid", "p@1"), 0.75, True),
    ]
    for part, limit in (("synthetic", 30), ("scale", 60)):
        hybrid = ("modes", "hybrid")
        out.append(
            Target(
                f"query p95 at {size(part)} (hybrid)",
                get(part, *hybrid, "p95_ms"),
                limit,
                False,
                " ms",
                get(part, *hybrid, "cpu_p95_ms"),
            )
        )
    for part in ("synthetic", "scale"):
        if part == "scale" and get("scale", "instant_entries"):
            continue  # instant entry vectors: no embedding cost measured
        out.append(
            Target(
                f"ingestion, short entries ({size(part)}), complete",
                get(part, "ingest", "kb", "entries_per_s"),
                150,
                True,
                "/s",
                get(part, "ingest", "kb", "entries_per_cpu_s"),
            )
        )
        out.append(
            Target(
                f"  of which searchable ({size(part)})",
                get(part, "ingest", "kb", "searchable_entries_per_s"),
                150,
                True,
                "/s",
            )
        )
    out.append(Target(f"peak RSS at {size('scale')}", rss / GIB if rss is not None else None, 2.0, False, " GiB"))
    out.append(
        Target(
            f"edit searchable p95 at {size('synthetic')}",
            get("synthetic", "edit", "p95_ms"),
            200,
            False,
            " ms",
            get("synthetic", "edit", "cpu_p95_ms"),
        )
    )
    return out


def print_targets(found: list[Target]) -> None:
    headers = ["target", "measured", "goal", "", "from CPU time (idle estimate)"]
    print_table(headers, [t.row() for t in found], title="Targets (issue 3)")


def print_synthetic(title: str, result: dict[str, Any]) -> None:
    print_modes(title, result, metrics=False)
    edit, ingest = result["edit"], result["ingest"]["kb"]
    after = ingest.get("after_embedding_s")
    print(
        f"ingestion {ingest['seconds']:.1f} s ({ingest['cpu_seconds']:.1f} s CPU) for {result['entries']} entries, "
        f"{result['vectors']} vectors"
        + (f"; {after:.1f} s of it after embedding (FAISS, BM25, saving)" if after is not None else "")
        + (
            f"; searchable (by every phrasing) after {ingest['searchable_s']:.1f} s = "
            f"{ingest['searchable_entries_per_s']:.0f} entries/s, the {ingest['background_answers']} whole-entry "
            "vectors then embedded in the background"
            if ingest.get("background_answers")
            else ""
        )
        + f"; index on disk {format_bytes(result['disk_bytes'])}"
        + (f"; peak RSS {format_bytes(result['peak_rss_bytes'])}" if "peak_rss_bytes" in result else "")
    )
    print(
        f"single-entry edit -> searchable: p50 {edit['p50_ms']:.0f} ms, p95 {edit['p95_ms']:.0f} ms "
        f"(CPU p95 {edit['cpu_p95_ms']:.0f} ms), max {edit['max_ms']:.0f} ms over {edit['edits']} edits "
        f"(kb.update alone p50 {edit['update_p50_ms']:.0f} ms); found at rank 1: {edit['found_at_1']}/{edit['edits']}"
    )
    if "search_during_save_p95_ms" in edit:
        print(
            f"after an edit the index files are rewritten in the background ({edit['save_ms']:.0f} ms); "
            f"{edit['searches_during_save']} searches meanwhile: p95 {edit['search_during_save_p95_ms']:.0f} ms, "
            f"max {edit['search_during_save_max_ms']:.0f} ms (no save running: p95 {edit['search_idle_p95_ms']:.0f} ms, "
            f"{_ratio(edit['search_during_save_p95_ms'], edit['search_idle_p95_ms'])})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of the dev sets")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--scale", action="store_true", help="also run 100,000 synthetic entries (slow; not CI)")
    parser.add_argument("--scale-only", action="store_true", help="run only the --scale part")
    parser.add_argument("--scale-entries", type=int, default=100_000, help=argparse.SUPPRESS)
    parser.add_argument("--synthetic-entries", type=int, default=10_000, help="size of the synthetic latency KB")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default 1)")
    parser.add_argument(
        "--instant-entries",
        action="store_true",
        help="scale run: real query embeddings, instant random vectors for the entries (latency, disk, RSS only)",
    )
    parser.add_argument(
        "--answer-tokens",
        type=int,
        help="kb.answer_tokens for this run (shipped 64; 0 embeds whole answers): compare runs with and without",
    )
    parser.add_argument("--scale-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import faiss

    threads_line = set_torch_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    settings = KBSettings() if args.answer_tokens is None else KBSettings(answer_tokens=args.answer_tokens)
    if args.scale_worker:  # the child of `scale_in_subprocess`: figures as one JSON line on stdout
        embedder: Embedder = make_embedder(settings)
        embedder.embed_batch(["load the model before any timing"])
        if args.instant_entries:
            embedder = InstantEntries(embedder)
        result = bench_synthetic(args.scale_worker, settings, embedder, edits=5)
        print(json.dumps({**result, "instant_entries": args.instant_entries}))
        return 0

    load = foreign_cpu_load()
    print(f"machine: foreign CPU load {load if load else 'unknown'}; {threads_line}; faiss {args.threads} thread(s)")
    print(
        f"settings: retrieval={settings.retrieval} bm25_weight={settings.bm25_weight} "
        f"answer_weight={settings.answer_weight} answer_tokens={settings.answer_tokens} embedding_batch_size={settings.embedding_batch_size}; k={K}"
    )
    report: dict[str, Any] = {
        "machine": {"foreign_cores_busy_at_start": load.foreign_cores if load else None, "threads": args.threads},
        "settings": {
            "bm25_weight": settings.bm25_weight,
            "answer_weight": settings.answer_weight,
            "answer_tokens": settings.answer_tokens,
            "k": K,
        },
        "dev_sets": {},
    }
    if not args.scale_only:
        embedder = make_embedder(settings)
        embedder.embed_batch(["load the model before any timing"])
        for ds in dev_sets(args.data_dir):
            if not (ds.faq.exists() and ds.queries.exists()):
                print(f"\n{ds.name}: skipped, {ds.faq.parent} not found (dev sets: ../shared/data, or --data-dir)")
                continue
            result = bench_dev_set(ds, settings, embedder)
            report["dev_sets"][ds.name] = result
            print_modes(f"{ds.name} ({result['entries']} entries, {result['queries']} labelled queries)", result)
            print_label_scope(result)

        n = args.synthetic_entries
        report["synthetic"] = bench_synthetic(n, settings, embedder)
        print_synthetic(f"{n} synthetic short entries (200 queries; latency only)", report["synthetic"])
        report["synthetic"]["peak_rss_bytes_main_process"] = peak_rss_bytes()

    if args.scale or args.scale_only:
        print(f"\nscale run: {args.scale_entries} synthetic entries in a subprocess (long)...", flush=True)
        report["scale"] = scale_in_subprocess(args.scale_entries, args.threads, settings, instant=args.instant_entries)
        kind = (
            "; instant random entry vectors: ranking, edits found and ingestion rate mean nothing"
            * args.instant_entries
        )
        print_synthetic(f"{args.scale_entries} synthetic short entries (subprocess{kind})", report["scale"])

    found = targets(report)
    report["targets"] = [{**t.__dict__, "verdict": t.verdict()} for t in found]
    print_targets(found)
    end = foreign_cpu_load()
    report["machine"]["foreign_cores_busy_at_end"] = end.foreign_cores if end else None
    print(f"\nforeign CPU load at the end: {end if end else 'unknown'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
