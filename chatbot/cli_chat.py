"""``supportbot chat``, ``supportbot eval`` and ``supportbot calibrate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from chatbot.answer_eval import answer_metrics, calibrate
from chatbot.cli import emit, progress_bar
from chatbot.services import build_engine, open_knowledge_base
from chatbot.settings import Settings, write_data_dir_config
from knowledge_base.evaluate import read_jsonl, retrieval_metrics

__all__ = ["add_commands"]


def add_commands(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("chat", parents=parents, help="ask the bot (one turn, a REPL, or a batch)")
    p.add_argument("message", nargs="?", help="one question; without it, an interactive multi-turn chat")
    p.add_argument("--queries-file", type=Path, help='JSONL with a "query" per line: one JSON line out per line in')
    p.add_argument("--conversation", help="continue this conversation id")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("eval", parents=parents, help="retrieval and answer metrics on labelled queries")
    p.add_argument("--queries-file", type=Path, required=True, help="JSONL: query + faq_id or relevant_faq_ids")
    p.add_argument("--negatives", type=Path, help="JSONL of out-of-scope queries (adds answer metrics)")
    p.add_argument("--answers", action="store_true", help="answer metrics even without --negatives")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("calibrate", parents=parents, help="threshold trade-off curve and suggested thresholds")
    p.add_argument("--queries", type=Path, required=True, help="labelled in-scope queries (JSONL)")
    p.add_argument("--negatives", type=Path, required=True, help="out-of-scope queries (JSONL)")
    p.add_argument("--min-negative-handoff", type=float, default=0.95)
    p.add_argument("--max-wrong", type=float, default=0.05)
    p.add_argument("--write", action="store_true", help="save the suggestion to <data_dir>/supportbot.toml")
    p.set_defaults(func=cmd_calibrate)


def _format_answer(answer: Any) -> str:
    lines = [
        answer.text,
        f"  [{answer.mode}] sources: {', '.join(answer.sources) or '-'}  ({answer.latency_ms:.0f} ms)",
    ]
    return "\n".join(lines)


def _chat_fields(answer: Any) -> dict[str, Any]:
    data = answer.to_dict()
    keys = ("answer", "mode", "sources", "scores", "latency_ms", "conversation_id", "message_id", "options")
    data["answer"] = data.pop("text")
    return {k: data[k] for k in keys}


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    engine = build_engine(settings)
    if args.queries_file:
        for row in read_jsonl(args.queries_file, require=["query"]):
            answer = engine.answer(str(row["query"]), client="cli-batch")
            print(json.dumps({**row, **_chat_fields(answer)}, ensure_ascii=False), flush=True)
        return 0
    if args.message is not None:
        answer = engine.answer(args.message, args.conversation, client="cli")
        emit(args, _chat_fields(answer), lambda: _format_answer(answer))
        return 0
    conversation = args.conversation
    print("Ask a question (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        print("bot> ", end="", flush=True)
        for event in engine.answer_stream(message, conversation, client="cli"):
            if event.kind == "delta" and not args.json:
                print(event.text, end="", flush=True)
            elif event.kind == "done" and event.answer:
                conversation = event.answer.conversation_id
                if args.json:
                    print(json.dumps(_chat_fields(event.answer), ensure_ascii=False))
                else:
                    streamed_differently = event.answer.mode != "generated"
                    if not streamed_differently and event.answer.reason.startswith("generated answer rejected"):
                        print(f"\n(replaced) {event.answer.text}", end="")
                    print(f"\n  [{event.answer.mode}] sources: {', '.join(event.answer.sources) or '-'}")
    return 0


def _format_answers(metrics: dict[str, Any]) -> str:
    lines = [
        f"answers on {metrics['queries']} labelled queries: mode mix {metrics['mode_mix']}",
        f"  right source {metrics['right_source']:.3f}  wrong source {metrics['wrong_source']:.3f}  "
        f"clarify {metrics['clarify']:.3f} (right option offered {metrics['clarify_with_right_option']:.3f})  "
        f"handed off {metrics['handed_off']:.3f}",
    ]
    if "negatives" in metrics:
        lines.append(
            f"  out-of-scope: {metrics['negatives']} queries, handed off {metrics['negatives_handed_off']:.3f} "
            f"(modes {metrics['negatives_mode_mix']})"
        )
    lines.append(f"  latency p50 {metrics['latency_ms']['p50']:.0f} ms, p95 {metrics['latency_ms']['p95']:.0f} ms")
    for mode, lat in metrics["latency_ms_by_mode"].items():
        lines.append(f"    {mode:10} n={lat['n']:<4} p50 {lat['p50']:.0f} ms  p95 {lat['p95']:.0f} ms")
    return "\n".join(lines)


def _format_retrieval(metrics: dict[str, Any]) -> str:
    lines = [f"{'':24} {'queries':>7} {'P@1':>6} {'hit@5':>6} {'MRR@10':>7}"]
    rows = [("overall", metrics["overall"]), *metrics["by_category"].items()]
    for name, m in rows:
        lines.append(f"{name:24} {m['queries']:>7} {m['p@1']:>6.3f} {m['hit@5']:>6.3f} {m['mrr@10']:>7.3f}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    rows = read_jsonl(args.queries_file, require=["query"])
    want_answers = args.negatives is not None or args.answers
    engine = build_engine(settings) if want_answers else None
    kb = engine.kb if engine else open_knowledge_base(settings)
    categories = {e.id: e.category for e in kb.entries()}
    metrics = retrieval_metrics(
        rows, lambda q: [h.entry.id for h in kb.search(q, 10)], category_of=lambda i: categories.get(i, "")
    )
    payload: dict[str, Any] = {"retrieval": metrics}
    if engine is not None:
        negatives = read_jsonl(args.negatives, require=["query"]) if args.negatives else []
        bar = progress_bar(not args.json)
        total = len(rows) + len(negatives)
        positives = []
        for i, row in enumerate(rows):
            a = engine.answer(str(row["query"]), client="eval")
            positives.append((row, a.mode, a.sources, a.latency_ms))
            if bar:
                bar("answering", i + 1, total)
        negative_results = []
        for i, row in enumerate(negatives):
            a = engine.answer(str(row["query"]), client="eval")
            negative_results.append((a.mode, a.latency_ms))
            if bar:
                bar("answering", len(rows) + i + 1, total)
        payload["answers"] = answer_metrics(positives, negative_results)
    emit(
        args,
        payload,
        lambda: (
            _format_retrieval(metrics) + ("\n\n" + _format_answers(payload["answers"]) if "answers" in payload else "")
        ),
    )
    return 0


def cmd_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    kb = open_knowledge_base(settings)
    k = max(settings.kb.top_k, settings.policy.max_clarify_options)
    rows = read_jsonl(args.queries, require=["query"])
    negatives = read_jsonl(args.negatives, require=["query"])
    positives = [(row, kb.search(str(row["query"]), k)) for row in rows]
    negative_hits = [kb.search(str(row["query"]), k) for row in negatives]
    result = calibrate(
        settings.policy,
        positives,
        negative_hits,
        min_negative_handoff=args.min_negative_handoff,
        max_wrong=args.max_wrong,
        progress=(lambda d, t: bar("sweeping", d, t)) if (bar := progress_bar(not args.json)) else None,
    )
    written = None
    if args.write and result["suggested"]:
        s = result["suggested"]
        fields = {k: s[k] for k in ("relevance_threshold", "faq_threshold", "clarify_margin")}
        written = str(write_data_dir_config(settings, {"policy": fields}))
        result["written"] = written

    def text() -> str:
        lines = ["relevance  handoff(neg)  right  wrong  clarify  handoff(pos)   (faq threshold = relevance)"]
        for row in result["curve"]:
            lines.append(
                f"  {row['relevance_threshold']:.2f}      {row['negatives_handed_off']:.3f}     {row['right']:.3f}  "
                f"{row['wrong']:.3f}  {row['clarify']:.3f}    {row['handoff']:.3f}"
            )
        for name in ("current", "suggested"):
            r = result[name]
            if r:
                lines.append(
                    f"{name}: relevance {r['relevance_threshold']:.2f}, faq {r['faq_threshold']:.2f}, "
                    f"margin {r['clarify_margin']:.2f} -> right {r['right']:.3f}, wrong {r['wrong']:.3f}, "
                    f"clarify {r['clarify']:.3f}, handoff {r['handoff']:.3f}, "
                    f"out-of-scope handed off {r['negatives_handed_off']:.3f}"
                )
        if not result["meets_goals"]:
            lines.append("no setting meets the goals; the suggestion is the least wrong one. Add phrasings to entries.")
        if written:
            lines.append(f"written to {written}")
        return "\n".join(lines)

    emit(args, result, text)
    return 0
