"""``supportbot chat``, ``supportbot eval`` and ``supportbot calibrate``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from chatbot.cli import emit
from chatbot.services import open_knowledge_base
from chatbot.settings import Settings
from knowledge_base.evaluate import read_jsonl, retrieval_metrics

__all__ = ["add_commands"]


def add_commands(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("eval", parents=parents, help="retrieval (and answer) metrics on labelled queries")
    p.add_argument("--queries-file", type=Path, required=True, help="JSONL: query + faq_id or relevant_faq_ids")
    p.add_argument("--negatives", type=Path, help="JSONL of out-of-scope queries (answer metrics)")
    p.add_argument("--retrieval-only", action="store_true", help="skip the answer metrics")
    p.set_defaults(func=cmd_eval)


def _format_retrieval(metrics: dict[str, Any]) -> str:
    lines = [f"{'':24} {'queries':>7} {'P@1':>6} {'hit@5':>6} {'MRR@10':>7}"]
    rows = [("overall", metrics["overall"]), *metrics["by_category"].items()]
    for name, m in rows:
        lines.append(f"{name:24} {m['queries']:>7} {m['p@1']:>6.3f} {m['hit@5']:>6.3f} {m['mrr@10']:>7.3f}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    kb = open_knowledge_base(settings)
    rows = read_jsonl(args.queries_file, require=["query"])
    categories = {e.id: e.category for e in kb.entries()}
    metrics = retrieval_metrics(
        rows, lambda q: [h.entry.id for h in kb.search(q, 10)], category_of=lambda i: categories.get(i, "")
    )
    payload: dict[str, Any] = {"retrieval": metrics}
    emit(args, payload, lambda: _format_retrieval(metrics))
    return 0
