"""``supportbot kb ...`` and ``supportbot eval`` (retrieval part): the knowledge-base commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

from chatbot.cli import emit, progress_bar
from chatbot.services import demo_file, open_knowledge_base
from chatbot.settings import Settings
from knowledge_base.errors import SupportBotError
from knowledge_base.evaluate import read_jsonl

__all__ = ["add_commands"]


def add_commands(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    kb = commands.add_parser("kb", help="manage the FAQ knowledge base")
    sub = kb.add_subparsers(dest="kb_command", required=True, metavar="ACTION")

    p = sub.add_parser("add", parents=parents, help="validate and upsert FAQ files (csv, tsv, xlsx, json, jsonl, md)")
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--demo", action="store_true", help="add the bundled demo FAQ (Northwind Goods)")
    p.add_argument("--skip-bad-rows", action="store_true", help="store the good rows and report the bad ones")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("list", parents=parents, help="list entries")
    p.add_argument("--category")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("remove", parents=parents, help="delete entries by id")
    p.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("export", parents=parents, help="write every entry to FILE (format by extension)")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("search", parents=parents, help="retrieve entries for a query (interactive without one)")
    p.add_argument("query", nargs="?")
    p.add_argument("-k", type=int, default=None, help="how many entries (default kb.top_k)")
    p.add_argument("--category")
    p.add_argument("--queries-file", type=Path, help='JSONL with a "query" per line: one output line per input line')
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "learn",
        parents=parents,
        help='learn resolved questions from a JSONL log ({"query", "faq_id"} per line): each becomes a '
        "labelled example and a learned phrasing of its entry",
    )
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("reindex", parents=parents, help="rebuild the FAISS and BM25 indexes from SQLite")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("stats", parents=parents, help="counts, categories, index size")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("held", parents=parents, help="entries held for review (never served until approved)")
    p.set_defaults(func=cmd_held)

    p = sub.add_parser("approve", parents=parents, help="serve held entries (after reading them)")
    p.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_approve)


def _kb(args: argparse.Namespace, settings: Settings) -> Any:
    json_lines = bool(args.json) and not sys.stderr.isatty()
    return open_knowledge_base(
        settings, progress=progress_bar(sys.stderr.isatty() or not args.json, json_lines=json_lines)
    )


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    files = list(args.files) + ([demo_file()] if args.demo else [])
    if not files:
        raise SupportBotError("no file given", fix="supportbot kb add FILE... (or --demo for the bundled FAQ)")
    kb = _kb(args, settings)
    start = time.perf_counter()
    report = kb.add_files(files, skip_bad_rows=args.skip_bad_rows)  # complete: commands do not defer
    seconds = time.perf_counter() - start

    def text() -> str:
        lines = [
            f"added {report.added}, updated {report.updated}, unchanged {report.unchanged}; "
            f"{report.total} entries in total ({seconds:.1f} s)"
        ]
        lines += [f"skipped {p}" for p in report.skipped]
        lines += [
            f"held for review {i}: {r} (read it, then: supportbot kb approve {i})" for i, r in report.held.items()
        ]
        return "\n".join(lines)

    emit(args, report.to_dict(), text)
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    kb = _kb(args, settings)
    entries = kb.entries(category=args.category)

    def text() -> str:
        rows = [f"{e.id}\t{e.category or '-'}\t{'' if e.enabled else '[disabled] '}{e.question}" for e in entries]
        return "\n".join(rows) or "(the knowledge base is empty: supportbot kb add FILE)"

    # Learned phrasings (from resolved questions) apart from the authored ones: an export and
    # re-upload of the entries never turns them into authored phrasings.
    records = [{**e.to_dict(), "learned_questions": kb.learned_questions(e.id)} for e in entries]
    emit(args, {"entries": records}, text)
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    removed = _kb(args, settings).delete(args.ids)
    missing = [i for i in args.ids if i not in removed]
    emit(
        args,
        {"removed": removed, "missing": missing},
        lambda: f"removed {len(removed)}" + (f"; not found: {', '.join(missing)}" if missing else ""),
    )
    return 0 if not missing else 1


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    count = _kb(args, settings).export(args.file)
    emit(args, {"exported": count, "file": str(args.file)}, f"wrote {count} entries to {args.file}")
    return 0


def _results(hits: list[Any]) -> list[dict[str, Any]]:
    return [{k: h.to_dict()[k] for k in ("id", "question", "answer", "score", "category", "matched")} for h in hits]


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    kb = _kb(args, settings)
    if args.queries_file:
        for row in read_jsonl(args.queries_file, require=["query"]):
            row["results"] = _results(kb.search(str(row["query"]), args.k, category=args.category))
            print(json.dumps(row, ensure_ascii=False))
        return 0
    if args.query is not None:
        hits = kb.search(args.query, args.k, category=args.category)
        emit(args, {"results": _results(hits)}, lambda: _format_hits(hits))
        return 0
    print(f"{len(kb)} entries. Type a question (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            query = input("? ").strip()
        except EOFError:
            break
        if not query:
            break
        hits = kb.search(query, args.k, category=args.category)
        emit(args, {"query": query, "results": _results(hits)}, _format_hits(hits))
    return 0


def _format_hits(hits: list[Any]) -> str:
    if not hits:
        return "(no match)"
    lines = []
    for h in hits:
        answer = h.entry.answer if len(h.entry.answer) < 160 else h.entry.answer[:157] + "..."
        lines.append(f"{h.score:.3f}  [{h.entry.id}] {h.entry.question}\n       {answer}")
    return "\n".join(lines)


def cmd_learn(args: argparse.Namespace, settings: Settings) -> int:
    from chatbot.learning import learn_file
    from chatbot.services import open_conversation_store

    kb = _kb(args, settings)
    before = cast(int, kb.stats()["learned_phrasings"])
    store = open_conversation_store(settings)  # its redaction rules; nothing is written there
    try:
        learned = learn_file(kb, store, args.file)
    finally:
        store.close()
    after = cast(int, kb.stats()["learned_phrasings"])
    result = {
        "examples": len(learned),
        "entries": len({e.entry_id for e in learned}),
        "learned_phrasings": after,
        "learned_phrasings_added": after - before,
        "file": str(args.file),
    }
    emit(
        args,
        result,
        f"learned {result['examples']} examples for {result['entries']} entries; "
        f"{after} learned phrasings in total ({result['learned_phrasings_added']:+d})",
    )
    return 0


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    kb = _kb(args, settings)
    start = time.perf_counter()
    result = kb.reindex()
    result_s = time.perf_counter() - start
    emit(
        args,
        result,
        f"rebuilt: {result['entries']} entries, {result['vectors']} vectors ({result['embedded']} embedded anew) in {result_s:.1f} s",
    )
    return 0


def cmd_held(args: argparse.Namespace, settings: Settings) -> int:
    kb = _kb(args, settings)
    held = kb.held()
    entries = {e.id: e for e in kb.store.get_many(list(held))}

    def text() -> str:
        rows = [f"{i}\t{r}\n    Q: {entries[i].question}\n    A: {entries[i].answer[:300]}" for i, r in held.items()]
        return "\n".join(rows) or "(no entry is held for review)"

    emit(args, {"held": [{"id": i, "reason": r, **entries[i].to_dict()} for i, r in held.items()]}, text)
    return 0


def cmd_approve(args: argparse.Namespace, settings: Settings) -> int:
    approved = _kb(args, settings).approve(args.ids)
    missing = [i for i in args.ids if i not in approved]
    emit(
        args,
        {"approved": approved, "not_held": missing},
        lambda: f"approved {len(approved)}" + (f"; not held: {', '.join(missing)}" if missing else ""),
    )
    return 0 if not missing else 1


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    stats = _kb(args, settings).stats()
    emit(args, stats, lambda: "\n".join(f"{k}: {v}" for k, v in stats.items()))
    return 0
