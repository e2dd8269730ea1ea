"""The support team's console: knowledge base, insights and fine-tuning, as one Gradio Blocks.

``ui.server`` mounts it at ``/admin`` behind the login. Four tabs:

* **Knowledge base**: upload FAQ files (validated as a whole, with a row-level problem table;
  nothing is stored on error unless "skip bad rows" is ticked), browse, search and filter the
  entries, add / edit / disable / delete one, export them, and test what a question would match
  (scores and the mode the answer policy would pick). The console and the chat share one
  ``KnowledgeBase`` object, so every change is live in the chat at once.
* **Insights**: the unanswered queue grouped into clusters of similar questions
  (:mod:`chatbot.insights`), each turned into a new FAQ entry (answer drafted by the LLM for the
  operator to edit) or into phrasings of an existing entry in one click, which resolves its queue
  items; thumbs-down answers with comments and a "correct this answer" action; activity plots and
  the most-hit entries; the conversation log as CSV.
* **Resolved questions** (:mod:`ui.console_learning`): the labelled examples every resolution
  recorded, filterable and removable, and the conversation transcripts, whose turns an operator
  labels with the entry that should have answered them.
* **Fine-tune**: the dataset a run would use (counts), one background run at a time
  (:mod:`ui.jobs`) with live progress and loss curve, the before/after evaluation, and the adapters
  with activate / roll back (the chat engine picks the change up at its next answer).

Callbacks only call the engine, the knowledge base, the conversation store, the adapter registry
and the job runner; the helpers at the top turn their results into tables and text.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from chatbot import learning
from chatbot.insights import DEFAULT_THRESHOLD, Cluster, cluster_unanswered
from chatbot.settings import Settings
from knowledge_base.entry import content_id
from knowledge_base.errors import IngestError, Problem, SupportBotError
from knowledge_base.export import EXPORT_FORMATS, render_entries
from ui.chat_page import CSS as CHAT_CSS
from ui.chat_page import HEAD, theme
from ui.console_handoffs import build_handoffs_tab
from ui.console_learning import build_learning_tab
from ui.console_settings import build_settings_tab
from ui.jobs import JobRunner

__all__ = [
    "MOUNT_OPTIONS",
    "adapters_table",
    "build_console",
    "clusters_table",
    "entries_table",
    "filter_entries",
    "hits_table",
    "problems_table",
    "stats_frames",
]

log = logging.getLogger(__name__)

UPLOAD_TYPES = [".csv", ".tsv", ".xlsx", ".json", ".jsonl", ".md", ".markdown"]
ALL = "All"
STATUS_CHOICES = [ALL, "Enabled", "Disabled"]
MODE_COLORS = {"faq": "#0d9488", "clarify": "#6366f1", "generated": "#f59e0b", "handoff": "#ef4444"}
ENTRY_COLUMNS = ["id", "category", "question", "phrasings", "answer", "tags", "enabled", "hits"]
PROBLEM_COLUMNS = ["where", "problem", "fix"]
HELD_COLUMNS = ["id", "why it is held", "question", "answer"]
HIT_COLUMNS = ["rank", "id", "question", "matched phrasing", "score", "dense", "lexical"]
CLUSTER_COLUMNS = ["#", "questions", "about", "wordings", "last asked"]
LOW_RATED_COLUMNS = ["rated", "question", "answer", "mode", "comment", "corrected"]
ADAPTER_COLUMNS = ["name", "active", "created", "base model", "steps", "train loss", "eval loss after"]
RETRIEVER_COLUMNS = [
    "name",
    "active",
    "created",
    "P@1 before → after (held-out questions)",
    "P@1 before → after (held-out entries)",
    "reranker",
    "thresholds (relevance / faq / margin)",
    "right / wrong / handed off",
    "out-of-scope handed off",
]

CONSOLE_CSS = (
    CHAT_CSS
    + """
.gradio-container { max-width: 1280px !important; }
#sb-console-header { align-items: center; }
#sb-console-header h1 { margin: 0; font-size: 1.3rem; }
table, table *, [role="grid"] * { font-family: var(--font) !important; }
.sb-cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(118px, 1fr)); gap: 10px; }
.sb-card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px 12px;
  background: var(--block-background-fill); }
.sb-card .v { font-size: 1.35rem; font-weight: 650; }
.sb-card .k { font-size: 0.8rem; color: var(--body-text-color-subdued); }
.sb-mode { font-weight: 650; padding: 1px 8px; border-radius: 999px; color: white; }
.sb-progress { height: 10px; border-radius: 6px; background: var(--border-color-primary); overflow: hidden; }
.sb-progress > div { height: 100%; background: var(--color-accent); }
"""
)

#: What ``gr.mount_gradio_app`` needs for the console (``ui.server`` reads it).
MOUNT_OPTIONS: dict[str, Any] = {"theme": theme(), "css": CONSOLE_CSS, "head": HEAD}


# -- presentation helpers (pure: tested without a server) ------------------------------------------


def _short(text: str, limit: int = 140) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def filter_entries(entries: Sequence[Any], text: str = "", category: str = ALL, status: str = ALL) -> list[Any]:
    """The entries matching a free-text filter (id, phrasings, answer, tags), a category and a status."""
    needle = " ".join((text or "").casefold().split())
    out = []
    for e in entries:
        if category not in (ALL, "", None) and e.category != category:
            continue
        if (status == "Enabled" and not e.enabled) or (status == "Disabled" and e.enabled):
            continue
        if needle:
            hay = " ".join([e.id, *e.questions, e.answer, e.category, *e.tags]).casefold()
            if not all(word in hay for word in needle.split()):
                continue
        out.append(e)
    return out


def entries_table(entries: Sequence[Any]) -> pd.DataFrame:
    rows = [
        [
            e.id,
            e.category,
            e.question,
            len(e.questions),
            _short(e.answer),
            ", ".join(e.tags),
            "yes" if e.enabled else "no",
            e.hits,
        ]
        for e in entries
    ]
    return pd.DataFrame(rows, columns=ENTRY_COLUMNS)


def problems_table(problems: Sequence[Problem]) -> pd.DataFrame:
    return pd.DataFrame([[p.where, p.message, p.fix] for p in problems], columns=PROBLEM_COLUMNS)


def hits_table(hits: Sequence[Any]) -> pd.DataFrame:
    rows = [
        [i, h.entry.id, h.entry.question, h.matched, round(h.score, 3), round(h.dense, 3), round(h.lexical, 3)]
        for i, h in enumerate(hits, start=1)
    ]
    return pd.DataFrame(rows, columns=HIT_COLUMNS)


def clusters_table(clusters: Sequence[Cluster]) -> pd.DataFrame:
    rows = [
        [i, c.count, c.label, len(c.questions), (c.last_seen or "")[:16].replace("T", " ")]
        for i, c in enumerate(clusters, start=1)
    ]
    return pd.DataFrame(rows, columns=CLUSTER_COLUMNS)


def stats_frames(stats: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Long-format frames for the plots: volume, mode mix, hand-off rate and latency per day.

    Days are timestamps, so the plots use a time axis (readable ticks however many days)."""
    days = [{**d, "date": pd.Timestamp(d["date"])} for d in stats.get("per_day", [])]
    volume = pd.DataFrame(
        [{"date": d["date"], "questions": d["questions"]} for d in days], columns=["date", "questions"]
    )
    modes = pd.DataFrame(
        [{"date": d["date"], "mode": m, "answers": n} for d in days for m, n in d["by_mode"].items()],
        columns=["date", "mode", "answers"],
    )
    handoff = pd.DataFrame(
        [
            {"date": d["date"], "hand-off %": round(100 * d["handoff_rate"], 1)}
            for d in days
            if d["handoff_rate"] is not None
        ],
        columns=["date", "hand-off %"],
    )
    latency = pd.DataFrame(
        [
            {"date": d["date"], "percentile": name, "ms": round(d[key], 1)}
            for d in days
            for name, key in (("p50", "latency_p50_ms"), ("p95", "latency_p95_ms"))
            if d[key] is not None
        ],
        columns=["date", "percentile", "ms"],
    )
    return {"volume": volume, "modes": modes, "handoff": handoff, "latency": latency}


def _cards(stats: dict[str, Any]) -> str:
    t = stats.get("totals", {})
    rate = t.get("handoff_rate")
    p50, p95 = t.get("latency_p50_ms"), t.get("latency_p95_ms")
    fb = stats.get("feedback", {})
    cards = [
        ("questions", str(t.get("questions", 0))),
        ("conversations", str(t.get("conversations", 0))),
        ("answered from the FAQ", str(t.get("by_mode", {}).get("faq", 0))),
        ("hand-off rate", "–" if rate is None else f"{100 * rate:.0f}%"),
        ("latency p50 / p95", "–" if p50 is None else f"{p50:.0f} / {p95:.0f} ms"),
        ("👍 / 👎", f"{fb.get('up', 0)} / {fb.get('down', 0)}"),
        ("open in the queue", str(stats.get("unanswered_open", 0))),
    ]
    body = "".join(f"<div class='sb-card'><div class='v'>{v}</div><div class='k'>{k}</div></div>" for k, v in cards)
    return f"<div class='sb-cards'>{body}</div>"


def adapters_table(infos: Sequence[Any]) -> pd.DataFrame:
    rows = []
    for info in infos:
        meta = info.metadata or {}
        metrics = meta.get("metrics", {}) or {}
        after = metrics.get("after", {}) or {}
        final = metrics.get("final_train_loss")
        rows.append(
            [
                info.name,
                "✅ serving" if info.active else "",
                str(info.created_at)[:16].replace("T", " "),
                str(meta.get("base_model", "")),
                (meta.get("extra") or {}).get("steps", meta.get("steps", "")),
                "" if not isinstance(final, (int, float)) else round(final, 4),
                "" if not isinstance(after.get("loss"), (int, float)) else round(after["loss"], 4),
            ]
        )
    return pd.DataFrame(rows, columns=ADAPTER_COLUMNS)


def retrievers_table(versions: Sequence[Any]) -> pd.DataFrame:
    """The retriever versions with their held-out figures and the trade-off of their thresholds."""

    def p1(report: dict[str, Any], split: str) -> str:
        b = report.get("before", {}).get(split, {}).get("p@1")
        a = report.get("after", {}).get(split, {}).get("p@1")
        return f"{b:.3f} → {a:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "-"

    rows = []
    for v in versions:
        report = v.report or {}
        rr = report.get("reranker", {})
        suggested = report.get("calibration", {}).get("suggested") or {}
        t = v.thresholds
        rows.append(
            [
                v.name,
                "✅ serving" if v.active else "",
                str(v.created_at)[:16].replace("T", " "),
                p1(report, "by_example"),
                p1(report, "by_entry"),
                ("on: " if v.reranker_enabled else "off: ") + str(rr.get("reason", "")),
                " / ".join(f"{t[k]:.2f}" for k in ("relevance_threshold", "faq_threshold", "clarify_margin") if k in t),
                " / ".join(f"{suggested[k]:.2f}" for k in ("right", "wrong", "handoff") if k in suggested) or "-",
                f"{suggested['negatives_handed_off']:.2f}" if "negatives_handed_off" in suggested else "-",
            ]
        )
    return pd.DataFrame(rows, columns=RETRIEVER_COLUMNS)


def _eval_table(result: dict[str, Any] | None) -> pd.DataFrame:
    from finetune.evaluate import summary_rows

    columns = ["metric", "before", "after", "change"]
    if not result:
        return pd.DataFrame([], columns=columns)
    if "retriever" in result:  # a retriever fine-tune: held-out retrieval figures
        report = result.get("report", {})
        rows = []
        for split in ("by_example", "by_entry"):
            b, a = report.get("before", {}).get(split, {}), report.get("after", {}).get(split, {})
            for metric in ("p@1", "hit@5", "mrr@10") if a.get("queries") else ():
                rows.append(
                    [f"{split} {metric}", round(b[metric], 4), round(a[metric], 4), round(a[metric] - b[metric], 4)]
                )
        lb = report.get("before", {}).get("latency_ms", {}).get("p95")
        la = report.get("after", {}).get("latency_ms", {}).get("p95")
        if isinstance(la, (int, float)) and isinstance(lb, (int, float)):
            rows.append(["query p95 ms", lb, la, round(la - lb, 2)])
        return pd.DataFrame(rows, columns=columns)
    rows = []
    for label, b, a in summary_rows(result.get("before", {}) or {}, result.get("after", {}) or {}):
        change = None if a is None or b is None else round(a - b, 4)
        rows.append([label, None if b is None else round(b, 4), None if a is None else round(a, 4), change])
    return pd.DataFrame(rows, columns=columns)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _tags(text: str) -> list[str]:
    return [t.strip() for t in (text or "").replace(";", ",").split(",") if t.strip()]


def _error_text(exc: SupportBotError) -> str:
    fix = f"\n\n*Fix:* {html.escape(exc.fix)}" if exc.fix else ""
    if isinstance(exc, IngestError):
        return f"❌ **{html.escape(exc.title)}** ({len(exc.problems)} problems){fix}"
    return f"❌ {html.escape(exc.message)}{fix}"


def _new_entry_bytes(
    *, entry_id: str, question: str, alt_questions: Sequence[str], answer: str, category: str, tags: Sequence[str]
) -> bytes:
    """One new entry as a JSON upload, so it passes the same validation as a file."""
    record: dict[str, Any] = {
        "question": question,
        "answer": answer,
        "alt_questions": list(alt_questions),
        "category": category,
        "tags": list(tags),
    }
    if entry_id.strip():
        record["id"] = entry_id.strip()
    return json.dumps([record], ensure_ascii=False).encode("utf-8")


def _entry_choice(entry: Any) -> tuple[str, str]:
    return (f"{entry.id} — {_short(entry.question, 80)}", entry.id)


def _download(data: bytes, name: str) -> str:
    folder = Path(tempfile.mkdtemp(prefix="supportbot-export-"))
    path = folder / name
    path.write_bytes(data)
    return str(path)


# -- the console -----------------------------------------------------------------------------------


def build_console(
    engine: Any, settings: Settings | None = None, auth: Any = None, *, runner: JobRunner | None = None
) -> gr.Blocks:
    """The team console for ``engine`` (its ``kb`` and ``store`` are the chat's own).

    ``auth`` (the server's login) is accepted for the server's call signature; the login itself
    happens before Gradio. ``runner``: the fine-tuning job runner (default: one per console, logs
    in ``<data_dir>/finetune/.jobs``)."""
    from chatbot.adapters import AdapterRegistry

    settings = settings or engine.settings
    kb, store = engine.kb, engine.store
    registry = AdapterRegistry(settings.data_dir)
    runner = runner or JobRunner(Path(settings.data_dir) / "finetune" / ".jobs")

    with gr.Blocks(title="SupportBot console", analytics_enabled=False) as console:
        with gr.Row(elem_id="sb-console-header"):
            gr.HTML("<h1>SupportBot · team console</h1>", padding=False)
            gr.HTML("<div style='text-align:right'><a href='logout'>Log out</a></div>", padding=False)
        with gr.Tabs():
            with gr.Tab("Knowledge base", id="kb"):
                kb_parts = _kb_tab(engine, kb)
            with gr.Tab("Insights", id="insights"):
                insight_parts = _insights_tab(engine, kb, store)
            with gr.Tab("Hand-offs", id="handoffs"):
                handoff_parts = build_handoffs_tab(engine)
            with gr.Tab("Resolved questions", id="learning"):
                learning_parts = build_learning_tab(engine)
            with gr.Tab("Fine-tune", id="finetune"):
                ft_parts = _finetune_tab(engine, kb, store, settings, registry, runner)
            with gr.Tab("Settings", id="settings"):
                settings_parts = build_settings_tab(engine)
        for load in (kb_parts, insight_parts, handoff_parts, learning_parts, ft_parts, settings_parts):
            console.load(load[0], load[1], load[2], api_visibility="private")
    return console


LoadSpec = tuple[Callable[..., Any], list[Any], list[Any]]


def _kb_tab(engine: Any, kb: Any) -> LoadSpec:
    def stats_text() -> str:
        s = kb.stats()
        cats = ", ".join(s["categories"]) or "none"
        return (
            f"**{s['entries']}** entries ({s['enabled']} enabled, {s['phrasings']} searchable phrasings) · "
            f"categories: {html.escape(cats)} · embeddings `{s['embedding_model']}`"
        )

    def refresh(text: str, category: str, status: str) -> tuple[Any, ...]:
        entries = kb.entries()
        cats = sorted({e.category for e in entries if e.category})
        shown = filter_entries(entries, text, category, status)
        choice = category if category in cats else ALL
        held = kb.held()
        by_id = {e.id: e for e in entries}
        held_rows = [[i, r, by_id[i].question, by_id[i].answer] for i, r in held.items() if i in by_id]
        return (
            entries_table(shown),
            stats_text(),
            gr.update(choices=[ALL, *cats], value=choice),
            f"{len(shown)} of {len(entries)} entries shown",
            gr.update(visible=bool(held_rows)),
            held_rows,
            gr.update(choices=[row[0] for row in held_rows], value=held_rows[0][0] if held_rows else None),
        )

    gr.Markdown("Upload, edit and test the FAQ the chat answers from. Changes are live in the chat at once.")
    stats_md = gr.Markdown()
    with gr.Accordion("Upload FAQ files", open=True):
        gr.Markdown(
            "CSV / TSV / XLSX with `question` and `answer` columns (optional `id`, `category`, `tags`, "
            "`alt_questions` separated by `|`), JSON / JSONL records with the same keys, or Markdown with "
            "`## question` headings. The whole upload is checked first: **nothing is stored if any row has a "
            "problem**, unless you choose to skip bad rows. Entries with a known id are updated in place."
        )
        with gr.Row():
            files = gr.File(
                label="FAQ files", file_count="multiple", file_types=UPLOAD_TYPES, scale=3, elem_id="sb-upload"
            )
            with gr.Column(scale=1, min_width=220):
                skip_bad = gr.Checkbox(label="Skip bad rows (store the good ones)", value=False)
                upload_button = gr.Button("Validate and upload", variant="primary", elem_id="sb-upload-btn")
        upload_report = gr.Markdown(elem_id="sb-upload-report")
        upload_problems = gr.Dataframe(
            headers=PROBLEM_COLUMNS, label="Problems", visible=False, wrap=True, interactive=False, max_height=300
        )

    with gr.Accordion("Held for review", open=True, visible=False, elem_id="sb-held") as held_box:
        gr.Markdown(
            "These entries address the assistant or ask customers for a secret (card number, CVV, password, "
            "PIN, one-time code). They are stored but **never served** until you read and approve them; "
            "editing one re-checks it."
        )
        held_table = gr.Dataframe(headers=HELD_COLUMNS, interactive=False, wrap=True, max_height=260)
        with gr.Row():
            held_pick = gr.Dropdown(label="Entry", choices=[], scale=3)
            approve_button = gr.Button("Approve: serve it in the chat", variant="primary", scale=1)
        approve_message = gr.Markdown()

    gr.Markdown("### Entries")
    with gr.Row():
        search = gr.Textbox(label="Search", placeholder="words in the id, questions, answer or tags", scale=3)
        category = gr.Dropdown(label="Category", choices=[ALL], value=ALL, scale=1)
        status = gr.Radio(label="Status", choices=STATUS_CHOICES, value=ALL, scale=1, min_width=300)
    shown_count = gr.Markdown()
    table = gr.Dataframe(
        headers=ENTRY_COLUMNS,
        interactive=False,
        wrap=True,
        max_height=420,
        elem_id="sb-entries",
        column_widths=["12%", "9%", "24%", "8%", "31%", "8%", "8%", "6%"],
    )
    gr.Markdown("Click a row to edit it.")

    editing = gr.State(None)
    with gr.Accordion("Entry", open=True, elem_id="sb-editor"):
        editor_title = gr.Markdown("**New entry**")
        with gr.Row():
            entry_id = gr.Textbox(label="ID", placeholder="empty: derived from the question", scale=1)
            entry_category = gr.Textbox(label="Category", scale=1)
            entry_tags = gr.Textbox(label="Tags", placeholder="comma-separated", scale=1)
            entry_enabled = gr.Checkbox(label="Enabled", value=True, scale=0, min_width=100)
        entry_question = gr.Textbox(label="Question")
        entry_alts = gr.Textbox(label="Alternative phrasings (one per line)", lines=3)
        entry_answer = gr.Textbox(label="Answer", lines=5)
        with gr.Row():
            save_button = gr.Button("Save", variant="primary", elem_id="sb-save")
            new_button = gr.Button("New entry", variant="secondary")
            toggle_button = gr.Button("Disable", variant="secondary", interactive=False)
            delete_button = gr.Button("Delete…", variant="stop", interactive=False)
            confirm_delete = gr.Button("Really delete", variant="stop", visible=False)
        editor_message = gr.Markdown()

    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Export")
            with gr.Row():
                export_format = gr.Dropdown(
                    label="Format", choices=sorted({v for v in EXPORT_FORMATS.values()}), value="csv", scale=1
                )
                export_button = gr.Button("Export all entries", scale=1)
            export_file = gr.File(label="Download", interactive=False, visible=False, height=90)
        with gr.Column(scale=2):
            gr.Markdown("### Retrieval test\nWhat would a customer's question match, and what would the bot do?")
            with gr.Row():
                probe = gr.Textbox(label="Question", scale=4, elem_id="sb-probe")
                probe_button = gr.Button("Test", scale=1)
            probe_decision = gr.Markdown()
            probe_hits = gr.Dataframe(
                headers=HIT_COLUMNS,
                interactive=False,
                wrap=True,
                column_widths=["7%", "15%", "29%", "25%", "8%", "8%", "8%"],
            )

    filters = [search, category, status]
    refreshed = [table, stats_md, category, shown_count, held_box, held_table, held_pick]

    def approve(entry_id: str | None, *filter_values: Any) -> tuple[Any, ...]:
        approved = kb.approve([entry_id]) if entry_id else []
        text = (
            f"✅ Approved `{html.escape(entry_id or '')}`: the chat serves it now."
            if approved
            else "Nothing to approve."
        )
        return (text, *refresh(*filter_values))

    editor_fields = [
        editing,
        editor_title,
        entry_id,
        entry_question,
        entry_alts,
        entry_answer,
        entry_category,
        entry_tags,
        entry_enabled,
        toggle_button,
        delete_button,
        confirm_delete,
    ]

    def editor_values(entry: Any | None) -> tuple[Any, ...]:
        if entry is None:
            return (
                None,
                "**New entry**",
                gr.update(value="", interactive=True),
                "",
                "",
                "",
                "",
                "",
                True,
                gr.update(value="Disable", interactive=False),
                gr.update(interactive=False),
                gr.update(visible=False),
            )
        learned = kb.learned_questions(entry.id)
        learned_text = (
            f"\n\n**Learned phrasings** ({len(learned)}, from resolved questions; remove one in *Resolved "
            "questions*): " + " · ".join(f"“{html.escape(_short(q, 80))}”" for q in learned)
            if learned
            else ""
        )
        return (
            entry.id,
            f"**Editing `{html.escape(entry.id)}`** · {entry.hits} hits · source {html.escape(entry.source or '–')}"
            + learned_text,
            gr.update(value=entry.id, interactive=False),
            entry.question,
            "\n".join(entry.alt_questions),
            entry.answer,
            entry.category,
            ", ".join(entry.tags),
            entry.enabled,
            gr.update(value="Disable" if entry.enabled else "Enable", interactive=True),
            gr.update(interactive=True),
            gr.update(visible=False),
        )

    def upload(paths: list[str] | None, skip: bool, *filter_values: Any) -> tuple[Any, ...]:
        if not paths:
            return ("Choose one or more files first.", gr.update(visible=False), *refresh(*filter_values))
        try:
            report = kb.add_files([Path(p) for p in paths], skip_bad_rows=skip)
        except IngestError as exc:
            return (
                _error_text(exc),
                gr.update(value=problems_table(exc.problems), visible=True),
                *refresh(*filter_values),
            )
        except SupportBotError as exc:
            return (_error_text(exc), gr.update(visible=False), *refresh(*filter_values))
        text = (
            f"✅ Stored: **{report.added}** added, **{report.updated}** updated, {report.unchanged} unchanged; "
            f"{report.total} entries in the knowledge base. The chat uses them now."
        )
        if report.answers_pending:
            text += (
                f" Ranking is being refined in the background: {report.answers_pending} entries are still "
                "matched by their questions alone (a minute or two per 10,000 entries)."
            )
        if report.held:
            text += f"\n\n⚠️ {len(report.held)} entries are held for review (see below): they are not served yet."
        if report.skipped:
            text += f"\n\n⚠️ {len(report.skipped)} bad rows were skipped:"
        problems = gr.update(value=problems_table(report.skipped), visible=bool(report.skipped))
        return (text, problems, *refresh(*filter_values))

    def select_entry(data: gr.SelectData) -> tuple[Any, ...]:
        row = data.row_value or []
        try:
            entry = kb.get(str(row[0]))
        except (SupportBotError, IndexError):
            return (*editor_values(None), "That entry no longer exists.")
        return (*editor_values(entry), "")

    def save(
        current: str | None,
        new_id: str,
        question: str,
        alts: str,
        answer: str,
        cat: str,
        tags: str,
        enabled: bool,
        *filter_values: Any,
    ) -> tuple[Any, ...]:
        try:
            if current:
                entry = kb.update(
                    current,
                    question=question,
                    alt_questions=_lines(alts),
                    answer=answer,
                    category=cat.strip(),
                    tags=_tags(tags),
                    enabled=bool(enabled),
                )
                message = f"✅ Saved `{html.escape(entry.id)}`."
            else:
                if new_id.strip():
                    try:
                        kb.get(new_id.strip())
                    except SupportBotError:
                        pass
                    else:
                        raise SupportBotError(
                            f"an entry with id {new_id.strip()!r} exists already",
                            fix="open it from the table to edit it, or choose another id",
                        )
                report = kb.add_bytes(
                    _new_entry_bytes(
                        entry_id=new_id,
                        question=question,
                        alt_questions=_lines(alts),
                        answer=answer,
                        category=cat.strip(),
                        tags=_tags(tags),
                    ),
                    "console.json",
                )
                ids = report.added_ids or report.updated_ids
                if not ids:
                    raise SupportBotError(
                        "an identical entry exists already", fix="search for its question in the table"
                    )
                entry = kb.get(ids[0])
                if not enabled:
                    entry = kb.update(entry.id, enabled=False)
                message = f"✅ Added `{html.escape(entry.id)}`: the chat answers it now."
        except IngestError as exc:
            problems = "\n".join(f"- {html.escape(str(p))}" for p in exc.problems)
            return (*gr_skip(len(editor_fields)), f"{_error_text(exc)}\n\n{problems}", *refresh(*filter_values))
        except SupportBotError as exc:
            return (*gr_skip(len(editor_fields)), _error_text(exc), *refresh(*filter_values))
        return (*editor_values(entry), message, *refresh(*filter_values))

    def toggle(current: str | None, *filter_values: Any) -> tuple[Any, ...]:
        if not current:
            return (*gr_skip(len(editor_fields)), "Open an entry first.", *refresh(*filter_values))
        entry = kb.get(current)
        entry = kb.update(current, enabled=not entry.enabled)
        state = "enabled: the chat uses it again" if entry.enabled else "disabled: the chat no longer uses it"
        return (*editor_values(entry), f"`{html.escape(entry.id)}` {state}.", *refresh(*filter_values))

    def ask_delete(current: str | None) -> Any:
        return gr.update(visible=bool(current))

    def delete(current: str | None, *filter_values: Any) -> tuple[Any, ...]:
        if not current:
            return (*editor_values(None), "Open an entry first.", *refresh(*filter_values))
        removed = kb.delete([current])
        message = f"🗑️ Deleted `{html.escape(current)}`." if removed else "It was deleted already."
        return (*editor_values(None), message, *refresh(*filter_values))

    def export(fmt: str) -> Any:
        suffix = next((s for s, name in EXPORT_FORMATS.items() if name == fmt), f".{fmt}")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
        path = _download(render_entries(kb.entries(), fmt), f"faq-{stamp}{suffix}")
        return gr.update(value=path, visible=True)

    def test_retrieval(question: str) -> tuple[Any, ...]:
        if not (question or "").strip():
            return "Type a question.", hits_table([])
        hits, decision = engine.decide(question)
        color = MODE_COLORS.get(decision.mode, "#64748b")
        text = (
            f"The bot would answer in mode <span class='sb-mode' style='background:{color}'>{decision.mode}</span> "
            f"— {html.escape(decision.reason)}"
        )
        return text, hits_table(hits)

    for trigger in (search.submit, category.change, status.change):
        trigger(refresh, filters, refreshed, api_visibility="private")
    upload_button.click(
        upload, [files, skip_bad, *filters], [upload_report, upload_problems, *refreshed], api_name="kb_upload"
    )
    table.select(select_entry, None, [*editor_fields, editor_message], api_visibility="private")
    new_button.click(
        lambda: (*editor_values(None), ""), None, [*editor_fields, editor_message], api_visibility="private"
    )
    save_button.click(
        save,
        [
            editing,
            entry_id,
            entry_question,
            entry_alts,
            entry_answer,
            entry_category,
            entry_tags,
            entry_enabled,
            *filters,
        ],
        [*editor_fields, editor_message, *refreshed],
        api_visibility="private",
    )
    toggle_button.click(
        toggle, [editing, *filters], [*editor_fields, editor_message, *refreshed], api_visibility="private"
    )
    delete_button.click(ask_delete, [editing], [confirm_delete], api_visibility="private")
    confirm_delete.click(
        delete, [editing, *filters], [*editor_fields, editor_message, *refreshed], api_visibility="private"
    )
    approve_button.click(approve, [held_pick, *filters], [approve_message, *refreshed], api_name="kb_approve")
    export_button.click(export, [export_format], [export_file], api_visibility="private")
    probe_button.click(test_retrieval, [probe], [probe_decision, probe_hits], api_name="kb_test")
    probe.submit(test_retrieval, [probe], [probe_decision, probe_hits], api_visibility="private")
    return refresh, filters, refreshed


def gr_skip(n: int) -> tuple[Any, ...]:
    return tuple(gr.skip() for _ in range(n))


def _insights_tab(engine: Any, kb: Any, store: Any) -> LoadSpec:
    gr.Markdown(
        "What customers asked, what the bot could not answer, and what they disliked. "
        "Fix a gap once and every queued question like it is resolved."
    )
    with gr.Row():
        days = gr.Radio(label="Period (days)", choices=[7, 30, 90], value=30, scale=2)
        refresh_button = gr.Button("Refresh", scale=1)
        export_button = gr.Button("Export conversations (CSV)", scale=1)
    export_file = gr.File(
        label="Conversations and labelled examples (CSV)",
        file_count="multiple",
        interactive=False,
        visible=False,
        height=120,
    )
    cards = gr.HTML()
    with gr.Row():
        volume_plot = gr.BarPlot(x="date", y="questions", title="Questions per day", height=240)
        modes_plot = gr.BarPlot(
            x="date",
            y="answers",
            color="mode",
            title="How the bot answered",
            height=240,
            color_map=MODE_COLORS,
        )
    with gr.Row():
        handoff_plot = gr.LinePlot(x="date", y="hand-off %", title="Hand-off rate (%)", height=240, y_lim=[0, 100])
        latency_plot = gr.LinePlot(x="date", y="ms", color="percentile", title="Answer latency (ms)", height=240)
    gr.Markdown("### Most-hit entries")
    most_hit = gr.Dataframe(headers=["entry", "question", "answers"], interactive=False, wrap=True, max_height=300)

    # -- the unanswered queue, clustered ---------------------------------------------------------
    gr.Markdown("### Unanswered questions, grouped\nHand-offs and thumbs-down answers, grouped by meaning.")
    clusters_state = gr.State([])
    selected = gr.State(None)
    with gr.Row():
        threshold = gr.Slider(
            label="Grouping strictness (similarity)", minimum=0.3, maximum=0.95, step=0.05, value=DEFAULT_THRESHOLD
        )
        queue_info = gr.Markdown()
    clusters_view = gr.Dataframe(
        headers=CLUSTER_COLUMNS, interactive=False, wrap=True, max_height=360, elem_id="sb-clusters"
    )
    with gr.Group(visible=False) as cluster_box:
        cluster_detail = gr.Markdown()
        with gr.Tabs():
            with gr.Tab("New FAQ entry"):
                draft_button = gr.Button("Draft an answer from related entries")
                new_question = gr.Textbox(label="Question")
                new_alts = gr.Textbox(label="Alternative phrasings (one per line)", lines=3)
                new_answer = gr.Textbox(label="Answer (edit before saving)", lines=4)
                new_category = gr.Textbox(label="Category")
                create_button = gr.Button("Save entry and resolve these questions", variant="primary")
            with gr.Tab("Phrasings of an existing entry"):
                target = gr.Dropdown(label="Entry", choices=[], allow_custom_value=False)
                phrase_button = gr.Button("Add the questions as phrasings and resolve", variant="primary")
            with gr.Tab("Dismiss"):
                gr.Markdown("Spam, off-topic or already handled: take these questions off the queue.")
                dismiss_button = gr.Button("Dismiss these questions", variant="stop")
        cluster_message = gr.Markdown()

    # -- low-rated answers -----------------------------------------------------------------------
    gr.Markdown("### Thumbs-down answers\nClick one to write the answer the bot should have given.")
    low_state = gr.State([])
    low_view = gr.Dataframe(
        headers=LOW_RATED_COLUMNS,
        interactive=False,
        wrap=True,
        max_height=360,
        column_widths=["12%", "22%", "34%", "9%", "15%", "8%"],
    )
    low_selected = gr.State(None)
    with gr.Group(visible=False) as correction_box:
        low_detail = gr.Markdown()
        correction = gr.Textbox(label="Corrected answer", lines=4)
        correction_entry = gr.Dropdown(
            label="The entry that answers this question (optional: the bot learns the wording for it)",
            choices=[],
            allow_custom_value=False,
        )
        correct_button = gr.Button("Save correction", variant="primary")
        correction_message = gr.Markdown()

    def refresh_stats(period: int) -> tuple[Any, ...]:
        stats = store.stats(days=int(period or 30))
        frames = stats_frames(stats)
        rows = []
        for entry_id, n in stats["most_hit_entries"]:
            try:
                question = kb.get(entry_id).question
            except SupportBotError:
                question = "(deleted)"
            rows.append([entry_id, question, n])
        return (
            _cards(stats),
            frames["volume"],
            frames["modes"],
            frames["handoff"],
            frames["latency"],
            pd.DataFrame(rows, columns=["entry", "question", "answers"]),
        )

    def refresh_queue(strictness: float) -> tuple[Any, ...]:
        items = store.unanswered(status="open")
        clusters = cluster_unanswered(items, kb.embedder, float(strictness))
        info = f"**{len(items)}** open questions in **{len(clusters)}** groups."
        low = store.low_rated(limit=200)
        low_rows = [
            [
                (r["rated_at"] or "")[:16].replace("T", " "),
                _short(r["question"], 100),
                _short(r["answer"], 120),
                r["mode"],
                r["comment"],
                "yes" if r["correction"] else "",
            ]
            for r in low
        ]
        return (
            [c.to_dict() for c in clusters],
            clusters_table(clusters),
            info,
            gr.update(visible=False),
            None,
            low,
            pd.DataFrame(low_rows, columns=LOW_RATED_COLUMNS),
            gr.update(visible=False),
        )

    def refresh_all(period: int, strictness: float) -> tuple[Any, ...]:
        return (*refresh_stats(period), *refresh_queue(strictness))

    def pick_cluster(clusters: list[dict[str, Any]], data: gr.SelectData) -> tuple[Any, ...]:
        row = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if not clusters or row is None or row >= len(clusters):
            return gr.update(visible=False), None, "", "", "", "", "", gr.update(), ""
        cluster = clusters[row]
        wordings = "\n".join(f"- {html.escape(q)}" for q in cluster["questions"][:30])
        more = f"\n- … and {len(cluster['questions']) - 30} more" if len(cluster["questions"]) > 30 else ""
        detail = (
            f"#### “{html.escape(cluster['label'])}”\nAsked **{cluster['count']}** times "
            f"(first {cluster['first_seen'][:10]}, last {cluster['last_seen'][:10]}). Wordings:\n{wordings}{more}"
        )
        hits = kb.search(cluster["label"], 5)
        choices = [_entry_choice(h.entry) for h in hits]
        seen = {c[1] for c in choices}
        choices += [_entry_choice(e) for e in kb.entries(enabled_only=False) if e.id not in seen]
        category = hits[0].entry.category if hits else ""
        return (
            gr.update(visible=True),
            cluster,
            detail,
            cluster["label"],
            "\n".join(cluster["questions"][1:]),
            "",
            category,
            gr.update(choices=choices, value=choices[0][1] if choices else None),
            "",
        )

    def draft(cluster: dict[str, Any] | None, question: str) -> str:
        text = (question or "").strip() or (cluster or {}).get("label", "")
        return engine.draft_answer(text) if text else ""

    def create_entry(
        cluster: dict[str, Any] | None, question: str, alts: str, answer: str, cat: str, strictness: float
    ) -> tuple[Any, ...]:
        if not cluster:
            return ("Pick a group first.", *refresh_queue(strictness))
        try:
            report = kb.add_bytes(
                _new_entry_bytes(
                    entry_id="", question=question, alt_questions=_lines(alts), answer=answer, category=cat, tags=[]
                ),
                "console.json",
            )
        except IngestError as exc:
            problems = "; ".join(str(p) for p in exc.problems)
            return (f"{_error_text(exc)}: {html.escape(problems)}", *gr_skip(8))
        # An identical entry already there (unchanged) has the id derived from the question.
        ids = report.added_ids or report.updated_ids or [content_id(question)]
        resolved, _ = learning.resolve_queue(kb, store, cluster["ids"], ids[0], source="assign")
        message = f"✅ Added entry `{html.escape(ids[0])}` and resolved {resolved} queued questions."
        return (message, *refresh_queue(strictness))

    def add_phrasings(cluster: dict[str, Any] | None, entry_id: str | None, strictness: float) -> tuple[Any, ...]:
        if not cluster or not entry_id:
            return ("Pick a group and an entry first.", *gr_skip(8))
        try:
            resolved, examples = learning.resolve_queue(kb, store, cluster["ids"], entry_id, source="phrasing")
        except SupportBotError as exc:
            return (_error_text(exc), *gr_skip(8))
        # Learned phrasings, not authored ones: searchable at once, and a wrong one is undone by
        # removing its example (Resolved questions tab).
        message = (
            f"✅ {len(examples)} phrasings learned for `{html.escape(entry_id)}`; {resolved} queued questions resolved."
        )
        return (message, *refresh_queue(strictness))

    def dismiss(cluster: dict[str, Any] | None, strictness: float) -> tuple[Any, ...]:
        if not cluster:
            return ("Pick a group first.", *gr_skip(8))
        n = store.dismiss_unanswered(cluster["ids"])
        return (f"Dismissed {n} questions.", *refresh_queue(strictness))

    def pick_low(rows: list[dict[str, Any]], data: gr.SelectData) -> tuple[Any, ...]:
        row = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if not rows or row is None or row >= len(rows):
            return gr.update(visible=False), None, "", "", "", gr.update()
        r = rows[row]
        detail = (
            f"**Question:** {html.escape(r['question'])}\n\n**Bot ({r['mode']}):** {html.escape(r['answer'])}\n\n"
            f"**Comment:** {html.escape(r['comment'] or '–')}"
        )
        hits = kb.search(r["question"], 5) if (r["question"] or "").strip() else []
        choices = [("(none)", "")] + [_entry_choice(h.entry) for h in hits]
        seen = {c[1] for c in choices}
        choices += [_entry_choice(e) for e in kb.entries(enabled_only=False) if e.id not in seen]
        entries = gr.update(choices=choices, value="")
        return gr.update(visible=True), r["message_id"], detail, r["correction"] or r["answer"], "", entries

    def save_correction(message_id: int | None, text: str, entry_id: str | None, request: gr.Request) -> str:
        if message_id is None:
            return "Pick an answer first."
        try:
            example = learning.correct_answer(
                kb,
                store,
                int(message_id),
                text,
                entry_id=entry_id or None,
                editor=getattr(request, "username", None) or "",
            )
        except SupportBotError as exc:
            return _error_text(exc)
        learned = f" The question is now a learned phrasing of `{html.escape(example.entry_id)}`." if example else ""
        return "✅ Correction saved: it is used as training data for the next fine-tune." + learned

    def export_csv() -> Any:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
        folder = Path(tempfile.mkdtemp(prefix="supportbot-export-"))
        path, examples = folder / f"conversations-{stamp}.csv", folder / f"examples-{stamp}.csv"
        store.export_csv(path)
        learning.export_examples_csv(kb, examples)  # the labelled examples, joined by message_id
        return gr.update(value=[str(path), str(examples)], visible=True)

    stats_outputs = [cards, volume_plot, modes_plot, handoff_plot, latency_plot, most_hit]
    queue_outputs = [
        clusters_state,
        clusters_view,
        queue_info,
        cluster_box,
        selected,
        low_state,
        low_view,
        correction_box,
    ]
    refresh_button.click(refresh_all, [days, threshold], [*stats_outputs, *queue_outputs], api_visibility="private")
    days.change(refresh_stats, [days], stats_outputs, api_visibility="private")
    threshold.release(refresh_queue, [threshold], queue_outputs, api_visibility="private")
    export_button.click(export_csv, None, [export_file], api_visibility="private")
    clusters_view.select(
        pick_cluster,
        [clusters_state],
        [
            cluster_box,
            selected,
            cluster_detail,
            new_question,
            new_alts,
            new_answer,
            new_category,
            target,
            cluster_message,
        ],
        api_visibility="private",
    )
    draft_button.click(draft, [selected, new_question], [new_answer], api_visibility="private")
    action_outputs = [cluster_message, *queue_outputs]
    create_button.click(
        create_entry,
        [selected, new_question, new_alts, new_answer, new_category, threshold],
        action_outputs,
        api_visibility="private",
    )
    phrase_button.click(add_phrasings, [selected, target, threshold], action_outputs, api_visibility="private")
    dismiss_button.click(dismiss, [selected, threshold], action_outputs, api_visibility="private")
    low_view.select(
        pick_low,
        [low_state],
        [correction_box, low_selected, low_detail, correction, correction_message, correction_entry],
        api_visibility="private",
    )
    correct_button.click(
        save_correction, [low_selected, correction, correction_entry], [correction_message], api_visibility="private"
    )
    return refresh_all, [days, threshold], [*stats_outputs, *queue_outputs]


def _finetune_tab(engine: Any, kb: Any, store: Any, settings: Settings, registry: Any, runner: JobRunner) -> LoadSpec:
    from ui.jobs import dataset_preview, finetune_command, settings_env

    ft = settings.finetune
    gr.Markdown(
        "Teach the model your FAQ's answers and your team's corrections with a LoRA adapter, compare it with "
        "the base model, and serve it (or roll back) without a restart. One run at a time, in the background."
    )
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### 1 · Data")
            use_kb = gr.Checkbox(label="FAQ entries (every phrasing → its answer)", value=True)
            use_conversations = gr.Checkbox(
                label="Curated conversations (thumbs-up answers and operator corrections)", value=True
            )
            preview_button = gr.Button("Build dataset preview")
            dataset_info = gr.Markdown()
            dataset_samples = gr.Dataframe(
                headers=["question", "answer", "source"],
                interactive=False,
                wrap=True,
                max_height=260,
                column_widths=["35%", "45%", "20%"],
            )
        with gr.Column(scale=1):
            gr.Markdown("### 2 · Run")
            adapter_name = gr.Textbox(label="Adapter name", value=lambda: dt.datetime.now().strftime("faq-%Y%m%d-%H%M"))
            with gr.Row():
                epochs = gr.Number(label="Epochs", value=ft.epochs, minimum=0.1, step=0.5)
                max_steps = gr.Number(label="Max steps (0 = all)", value=0, minimum=0, precision=0)
            with gr.Row():
                learning_rate = gr.Number(label="Learning rate", value=ft.learning_rate)
                rank = gr.Dropdown(label="LoRA rank", choices=[4, 8, 16, 32, 64], value=ft.rank)
            with gr.Row():
                activate = gr.Checkbox(label="Serve it when done", value=False)
                answer_eval = gr.Checkbox(label="Evaluate answers (slower)", value=True)
            with gr.Row():
                resume = gr.Checkbox(label="Resume a stopped run of this name", value=False)
                overwrite = gr.Checkbox(label="Replace an adapter of this name", value=False)
            with gr.Row():
                start_button = gr.Button("Start fine-tune", variant="primary", elem_id="sb-ft-start")
                stop_button = gr.Button("Stop (keeps a checkpoint)", variant="stop")
            start_message = gr.Markdown()
    gr.Markdown("### 3 · Progress")
    job_status = gr.HTML("<p>No run yet.</p>", elem_id="sb-ft-status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", color="split", title="Loss", height=260, scale=2)
        job_log = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, autoscroll=True, scale=1)
    eval_table = gr.Dataframe(
        headers=["metric", "before", "after", "change"], label="Evaluation: base model vs. adapter", interactive=False
    )
    gr.Markdown("### 4 · Adapters\nThe chat serves the active adapter from its next answer on.")
    adapters_view = gr.Dataframe(headers=ADAPTER_COLUMNS, interactive=False, wrap=True)
    with gr.Row():
        adapter_choice = gr.Dropdown(label="Adapter", choices=[], scale=2)
        activate_button = gr.Button("Activate", variant="primary", scale=1)
        rollback_button = gr.Button("Roll back to the base model", scale=1)
        remove_button = gr.Button("Delete", variant="stop", scale=1)
    adapter_message = gr.Markdown()
    retriever_parts = _retriever_section(engine, settings, runner)
    timer = gr.Timer(2.0)
    last_seen = gr.State("")

    def preview(with_kb: bool, with_conversations: bool) -> tuple[Any, ...]:
        info = dataset_preview(
            kb.entries(), store.training_pairs(), settings, from_kb=with_kb, from_conversations=with_conversations
        )
        lines = [
            f"- FAQ: **{info['kb_pairs']}** question/answer pairs from {info['entries']} enabled entries",
            f"- conversations: **{info['conversation_pairs']}** pairs ({info['thumbs_up']} thumbs-up answers, "
            f"{info['corrections']} corrections)",
        ]
        if "train_examples" in info:
            lines.append(
                f"- split: **{info['train_examples']}** training examples ({info['train_groups']} entries), "
                f"**{info['eval_examples']}** evaluation examples ({info['eval_groups']} held-out entries); "
                f"{info['duplicates_dropped']} duplicates dropped; layout `{info['layout']}`"
            )
        lines += [f"- ⚠️ {html.escape(p)}" for p in info["problems"]]
        samples = pd.DataFrame(
            [[_short(s["question"], 90), _short(s["answer"], 120), s["source"]] for s in info["samples"]],
            columns=["question", "answer", "source"],
        )
        return "\n".join(lines), samples

    def adapters_view_values() -> tuple[Any, ...]:
        infos = registry.list()
        active = next((i.name for i in infos if i.active), None)
        names = [i.name for i in infos]
        return adapters_table(infos), gr.update(choices=names, value=active or (names[-1] if names else None))

    def start(
        name: str,
        n_epochs: float,
        steps: float,
        lr: float,
        r: int,
        with_kb: bool,
        with_conversations: bool,
        do_activate: bool,
        do_eval: bool,
        do_resume: bool,
        do_overwrite: bool,
    ) -> str:
        try:
            argv = finetune_command(
                (name or "").strip(),
                from_kb=with_kb,
                from_conversations=with_conversations,
                epochs=float(n_epochs) if n_epochs else None,
                max_steps=int(steps) if steps else None,
                learning_rate=float(lr) if lr else None,
                rank=int(r) if r else None,
                resume=do_resume,
                overwrite=do_overwrite,
                activate=do_activate,
                answer_eval=do_eval,
            )
            runner.start((name or "").strip(), argv, env=settings_env(settings))
        except SupportBotError as exc:
            return _error_text(exc)
        return f"▶️ Started `{html.escape(name.strip())}`. Progress shows below; the chat keeps answering meanwhile."

    def stop() -> str:
        # What the run really kept is known once it has stopped: the status line says it then.
        return (
            "Stopping: the run saves a checkpoint if it has trained a step…"
            if runner.cancel()
            else "No run is in progress."
        )

    def poll(seen: str) -> tuple[Any, ...]:
        status = runner.status()
        if status is None:
            return (gr.skip(),) * 6 + (seen,)
        key = f"{status.name}|{status.state}|{status.phase}|{status.step}|{len(status.log_tail)}|{status.finished_at}"
        if key == seen:
            return (gr.skip(),) * 6 + (seen,)
        bar = f"<div class='sb-progress'><div style='width:{100 * status.fraction:.1f}%'></div></div>"
        head = html.escape(status.summary())
        body = f"<p><strong>{head}</strong></p>{bar}"
        if status.error:
            fix = status.error.get("fix") or ""
            body += f"<p>❌ {html.escape(str(status.error.get('message', '')))}<br><em>{html.escape(fix)}</em></p>"
        losses = [{"step": s, "loss": v, "split": "train"} for s, v in status.losses]
        losses += [{"step": s, "loss": v, "split": "eval"} for s, v in status.eval_losses]
        frame = pd.DataFrame(losses, columns=["step", "loss", "split"])
        finished_now = not status.running and (not seen or seen.split("|")[1] == "running")
        adapters = adapters_view_values()[0] if finished_now else gr.skip()
        retrievers = retriever_parts[0]()[0] if finished_now else gr.skip()
        log_text = "\n".join(status.log_tail[-60:])
        return body, frame, log_text, _eval_table(status.result), adapters, retrievers, key

    def do_activate(name: str | None) -> tuple[Any, ...]:
        if not name:
            return ("Pick an adapter.", *adapters_view_values())
        try:
            info = registry.activate(name)
        except SupportBotError as exc:
            return (_error_text(exc), *adapters_view_values())
        return (f"✅ Serving `{html.escape(info.name)}` from the next answer on.", *adapters_view_values())

    def do_rollback() -> tuple[Any, ...]:
        previous = registry.deactivate()
        text = (
            f"↩️ `{html.escape(previous.name)}` deactivated: the base model answers from the next answer on."
            if previous
            else "No adapter was active: the base model is serving."
        )
        return (text, *adapters_view_values())

    def do_remove(name: str | None) -> tuple[Any, ...]:
        if not name:
            return ("Pick an adapter.", *adapters_view_values())
        try:
            registry.remove(name)
        except SupportBotError as exc:
            return (_error_text(exc), *adapters_view_values())
        return (f"🗑️ Deleted `{html.escape(name)}`.", *adapters_view_values())

    preview_button.click(
        preview, [use_kb, use_conversations], [dataset_info, dataset_samples], api_visibility="private"
    )
    start_button.click(
        start,
        [
            adapter_name,
            epochs,
            max_steps,
            learning_rate,
            rank,
            use_kb,
            use_conversations,
            activate,
            answer_eval,
            resume,
            overwrite,
        ],
        [start_message],
        api_visibility="private",
    )
    stop_button.click(stop, None, [start_message], api_visibility="private")
    timer.tick(
        poll,
        [last_seen],
        [job_status, loss_plot, job_log, eval_table, adapters_view, retriever_parts[1][0], last_seen],
        api_visibility="private",
        show_progress="hidden",
    )
    adapter_outputs = [adapter_message, adapters_view, adapter_choice]
    activate_button.click(do_activate, [adapter_choice], adapter_outputs, api_visibility="private")
    rollback_button.click(do_rollback, None, adapter_outputs, api_visibility="private")
    remove_button.click(do_remove, [adapter_choice], adapter_outputs, api_visibility="private")

    retriever_values, retriever_outputs = retriever_parts

    def on_load(with_kb: bool, with_conversations: bool) -> tuple[Any, ...]:
        return (*preview(with_kb, with_conversations), *adapters_view_values(), *retriever_values())

    return (
        on_load,
        [use_kb, use_conversations],
        [dataset_info, dataset_samples, adapters_view, adapter_choice, *retriever_outputs],
    )


def _retriever_section(engine: Any, settings: Settings, runner: JobRunner) -> tuple[Any, list[Any]]:
    """The fine-tune page's retriever part: start a retriever fine-tune (same job runner and
    progress view as the LoRA run, same request validation as the CLI), and list, activate, roll
    back or delete retriever versions with their held-out figures and thresholds' trade-off.
    Returns (values for the page load, their outputs)."""
    from knowledge_base.retrievers import RetrieverRegistry
    from ui.jobs import retriever_command, settings_env

    registry = RetrieverRegistry(settings.data_dir)
    gr.Markdown(
        "### 5 · Retriever\nTeach the search which entry customers mean: the embedder is fine-tuned on the "
        "entries' phrasings and on labelled customer questions, a reranker is added only if it wins on held-out "
        "questions without slowing answers, and the answer thresholds are recalibrated for it. Activating "
        "re-embeds the knowledge base in the background; the current version answers until the swap."
        + (
            " Thresholds are pinned (`policy.pin_thresholds`): a version's own are not applied."
            if settings.policy.pin_thresholds
            else ""
        )
    )
    with gr.Row():
        name = gr.Textbox(label="Retriever name", value=lambda: dt.datetime.now().strftime("ret-%Y%m%d-%H%M"), scale=2)
        epochs = gr.Number(label="Epochs", value=1.0, minimum=0.1, step=0.5, scale=1)
        reranker = gr.Dropdown(label="Reranker", choices=["auto", "train", "off"], value="auto", scale=1)
    with gr.Row():
        activate = gr.Checkbox(label="Serve it when done", value=False)
        resume = gr.Checkbox(label="Resume a stopped run of this name", value=False)
        overwrite = gr.Checkbox(label="Replace a retriever of this name", value=False)
        start_button = gr.Button("Start retriever fine-tune", variant="primary", elem_id="sb-rt-start")
    start_message = gr.Markdown()
    view = gr.Dataframe(headers=RETRIEVER_COLUMNS, interactive=False, wrap=True)
    with gr.Row():
        choice = gr.Dropdown(label="Retriever", choices=[], scale=2)
        activate_button = gr.Button("Activate", variant="primary", scale=1)
        rollback_button = gr.Button("Roll back", scale=1)
        remove_button = gr.Button("Delete", variant="stop", scale=1)
    message = gr.Markdown()

    def retriever_values() -> tuple[Any, ...]:
        versions = registry.list()
        active = next((v.name for v in versions if v.active), None)
        names = [v.name for v in versions]
        return retrievers_table(versions), gr.update(choices=names, value=active or (names[-1] if names else None))

    def start_retriever(
        text: str, n_epochs: float, mode: str, do_activate: bool, do_resume: bool, do_overwrite: bool
    ) -> str:
        output = (text or "").strip()
        try:
            argv = retriever_command(
                output,
                epochs=float(n_epochs) if n_epochs else None,
                reranker=mode or None,
                resume=do_resume,
                overwrite=do_overwrite,
                activate=do_activate,
            )
            runner.start(output, argv, env=settings_env(settings))
        except SupportBotError as exc:
            return _error_text(exc)
        return f"▶️ Started `{html.escape(output)}`. Progress shows above; the chat keeps answering meanwhile."

    def swap_note() -> str:
        try:
            engine.sync_retriever()  # starts the background re-embedding now rather than at the next question
        except SupportBotError as exc:
            return " " + _error_text(exc)
        return " Re-embedding in the background; the previous version answers until the swap."

    def activate_retriever(selected: str | None) -> tuple[Any, ...]:
        if not selected:
            return ("Pick a retriever.", *retriever_values())
        try:
            version = registry.activate(selected)
        except SupportBotError as exc:
            return (_error_text(exc), *retriever_values())
        return (f"✅ `{html.escape(version.name)}` activated.{swap_note()}", *retriever_values())

    def rollback_retriever() -> tuple[Any, ...]:
        version = registry.rollback()
        what = f"`{html.escape(version.name)}`" if version else "the configured embedding model"
        return (f"↩️ Rolled back to {what}.{swap_note()}", *retriever_values())

    def remove_retriever(selected: str | None) -> tuple[Any, ...]:
        if not selected:
            return ("Pick a retriever.", *retriever_values())
        try:
            registry.remove(selected)
        except SupportBotError as exc:
            return (_error_text(exc), *retriever_values())
        return (f"🗑️ Deleted `{html.escape(selected)}`.", *retriever_values())

    start_button.click(
        start_retriever,
        [name, epochs, reranker, activate, resume, overwrite],
        [start_message],
        api_visibility="private",
    )
    outputs = [message, view, choice]
    activate_button.click(activate_retriever, [choice], outputs, api_visibility="private")
    rollback_button.click(rollback_retriever, None, outputs, api_visibility="private")
    remove_button.click(remove_retriever, [choice], outputs, api_visibility="private")
    return retriever_values, [view, choice]
