"""Learned phrasings through the real CLI: zero-shot vs k learned questions per entry, and whether
learned phrasings should also feed BM25 (``kb.learned_in_bm25``).

For a dev set (an FAQ file and a queries file with ``faq_id``), the first ``k`` queries of each
entry are learned with ``supportbot kb learn`` and the rest are the test set, scored with
``supportbot eval --queries-file`` before (the zero-shot baseline, same run) and after.

    OMP_NUM_THREADS=1 python -m benchmarks.learned_phrasings --set ../shared/data/stackfaq -k 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    command = [sys.executable, "-m", "chatbot.cli", *args, "--data-dir", str(data_dir), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def split(queries: Path, k: int, folder: Path) -> tuple[Path, Path, int, int]:
    by_entry: dict[str, list[dict[str, object]]] = defaultdict(list)
    for line in queries.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_entry[str(row["faq_id"])].append(row)
    learn, test = folder / "learn.jsonl", folder / "test.jsonl"
    n_learn = n_test = 0
    with learn.open("w", encoding="utf-8") as lf, test.open("w", encoding="utf-8") as tf:
        for rows in by_entry.values():
            for row in rows[:k]:
                lf.write(json.dumps({"query": row["query"], "faq_id": row["faq_id"]}) + "\n")
                n_learn += 1
            for row in rows[k:]:
                tf.write(json.dumps(row) + "\n")
                n_test += 1
    return learn, test, n_learn, n_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="dataset", type=Path, required=True, help="folder with faq.jsonl, queries.jsonl")
    parser.add_argument("-k", type=int, default=5, help="learned queries per entry")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        learn, test, n_learn, n_test = split(args.dataset / "queries.jsonl", args.k, folder)
        data = folder / "data"
        dense_env = {"SUPPORTBOT_KB_LEARNED_IN_BM25": "false"}  # first without, then with (the default)
        cli(data, "kb", "add", str(args.dataset / "faq.jsonl"), env=dense_env)

        def p_at_1(env: dict[str, str] | None = None) -> dict[str, float]:
            overall: dict[str, float] = cli(data, "eval", "--queries-file", str(test), env=env)["retrieval"]["overall"]  # type: ignore[index]
            return {k: round(float(overall[k]), 3) for k in ("p@1", "hit@5", "mrr@10")}

        zero = p_at_1(dense_env)
        start = time.perf_counter()
        learned = cli(data, "kb", "learn", str(learn), env=dense_env)
        learn_s = time.perf_counter() - start
        dense_only = p_at_1(dense_env)
        bm25_env = {"SUPPORTBOT_KB_LEARNED_IN_BM25": "true"}
        cli(data, "kb", "reindex", env=bm25_env)
        with_bm25 = p_at_1(bm25_env)
    print(f"{args.dataset.name}: learn {n_learn} ({args.k}/entry), test {n_test}; kb learn {learn_s:.1f} s: {learned}")
    print(f"{'ranking':<40} {'P@1':>6} {'hit@5':>6} {'MRR@10':>7}")
    for name, m in (
        ("zero-shot (baseline, same run)", zero),
        ("learned phrasings, dense only", dense_only),
        ("learned phrasings, dense + BM25 text", with_bm25),
    ):
        print(f"{name:<40} {m['p@1']:>6.3f} {m['hit@5']:>6.3f} {m['mrr@10']:>7.3f}")


if __name__ == "__main__":
    main()
