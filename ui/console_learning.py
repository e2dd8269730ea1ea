"""The console's "Resolved questions" tab: labelled examples and conversation transcripts.

* **Labelled examples**: every resolution the product recorded (`chatbot.learning`), filterable by
  wording, entry, source and polarity; click a row and remove it to undo a wrong label (its learned
  phrasing leaves the ranking at once); download them as CSV, next to the conversation export.
* **Conversations**: the latest conversations; open one to read its transcript, pick a turn and the
  entry that should have answered it, and label it (an ``annotation`` example).

Callbacks only call `chatbot.learning`, the knowledge base and the conversation store.
"""

from __future__ import annotations

import datetime as dt
import html
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from chatbot import learning
from knowledge_base.errors import SupportBotError
from knowledge_base.examples import SOURCES

__all__ = ["EXAMPLE_COLUMNS", "TRANSCRIPT_COLUMNS", "build_learning_tab", "examples_table", "transcript_table"]

ALL = "All"
POLARITY = [ALL, "Positive", "Negative"]
EXAMPLE_COLUMNS = ["id", "when", "source", "label", "entry", "customer question", "conversation"]
CONVERSATION_COLUMNS = ["conversation", "started", "channel", "messages", "first question"]
TRANSCRIPT_COLUMNS = ["message", "who", "text", "mode", "sources"]


def _short(text: str, limit: int = 140) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _when(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def examples_table(examples: list[Any]) -> pd.DataFrame:
    rows = [
        [
            e.id,
            _when(e.created_at),
            e.source,
            "✅ answers it" if e.positive else "❌ wrong for it",
            e.entry_id,
            _short(e.query, 160),
            (e.conversation_id or "")[:8],
        ]
        for e in examples
    ]
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)


def transcript_table(messages: list[Any]) -> pd.DataFrame:
    rows = [
        [
            m.id,
            "customer" if m.role == "user" else "bot",
            _short(m.text, 220),
            m.mode or "",
            ", ".join(m.sources),
        ]
        for m in messages
    ]
    return pd.DataFrame(rows, columns=TRANSCRIPT_COLUMNS)


def _row_index(data: gr.SelectData) -> int | None:
    return data.index[0] if isinstance(data.index, (list, tuple)) else data.index


def _error(exc: SupportBotError) -> str:
    fix = f"\n\n*Fix:* {html.escape(exc.fix)}" if exc.fix else ""
    return f"❌ {html.escape(exc.message)}{fix}"


def build_learning_tab(engine: Any) -> tuple[Any, list[Any], list[Any]]:
    """The tab's components and callbacks; returns (load function, its inputs, its outputs)."""
    kb, store = engine.kb, engine.store
    gr.Markdown(
        "Every resolved question (a clarify option clicked, a thumbs up or down, a queued question "
        "added as a phrasing, a correction, an annotation, the API or `supportbot kb learn`) is kept "
        "here as a labelled example. A positive one is a *learned phrasing* of its entry at once; "
        "remove a wrong one and it stops counting immediately."
    )
    with gr.Row():
        text = gr.Textbox(label="Customer question contains", scale=3)
        entry = gr.Textbox(label="Entry id", scale=2)
        source = gr.Dropdown(label="Source", choices=[ALL, *SOURCES], value=ALL, scale=1)
        polarity = gr.Radio(label="Label", choices=POLARITY, value=ALL, scale=2, min_width=260)
    with gr.Row():
        refresh_button = gr.Button("Refresh", scale=1)
        export_button = gr.Button("Export examples (CSV)", scale=1)
    counts = gr.Markdown()
    table = gr.Dataframe(
        headers=EXAMPLE_COLUMNS,
        interactive=False,
        wrap=True,
        max_height=420,
        elem_id="sb-examples",
        column_widths=["6%", "13%", "10%", "12%", "14%", "37%", "8%"],
    )
    picked = gr.State(None)
    with gr.Row():
        picked_text = gr.Markdown("Click an example to select it.")
        remove_button = gr.Button("Remove this example", variant="stop", interactive=False, scale=0, min_width=200)
    message = gr.Markdown()
    export_file = gr.File(label="Labelled examples CSV", interactive=False, visible=False, height=90)

    gr.Markdown(
        "### Conversations\nOpen a conversation, pick a customer's turn and the entry that should have "
        "answered it, and label it: the bot learns that wording for that entry."
    )
    with gr.Row():
        conv_text = gr.Textbox(label="A message contains", scale=3)
        conv_button = gr.Button("Show conversations", scale=1)
    conversations_state = gr.State([])
    conversations = gr.Dataframe(headers=CONVERSATION_COLUMNS, interactive=False, wrap=True, max_height=300)
    transcript_state = gr.State([])
    transcript = gr.Dataframe(headers=TRANSCRIPT_COLUMNS, interactive=False, wrap=True, max_height=420)
    turn = gr.State(None)
    with gr.Group(visible=False) as annotate_box:
        turn_text = gr.Markdown()
        target = gr.Dropdown(label="The entry that answers it", choices=[], allow_custom_value=False)
        annotate_button = gr.Button("Label this turn", variant="primary")
        annotate_message = gr.Markdown()

    filters = [text, entry, source, polarity]

    def refresh_examples(needle: str, entry_id: str, src: str, label: str) -> tuple[Any, ...]:
        found = kb.examples(
            entry_id=(entry_id or "").strip() or None,
            source=None if src in (ALL, "", None) else src,
            text=(needle or "").strip() or None,
            positive=None if label in (ALL, "", None) else label == "Positive",
            limit=2000,
        )
        stats = kb.stats()
        summary = (
            f"**{len(found)}** shown · {stats['examples']['examples']} examples in all "
            f"({stats['examples']['positive']} positive) · {stats['learned_phrasings']} learned phrasings searched"
        )
        return examples_table(found), summary, None, "Click an example to select it.", gr.update(interactive=False)

    def pick_example(frame: pd.DataFrame, data: gr.SelectData) -> tuple[Any, ...]:
        row = _row_index(data)
        if row is None or frame is None or row >= len(frame):
            return None, "Click an example to select it.", gr.update(interactive=False)
        example_id = int(frame.iloc[row]["id"])
        found = [e for e in kb.examples(entry_id=str(frame.iloc[row]["entry"])) if e.id == example_id]
        if not found:
            return None, "That example was removed already.", gr.update(interactive=False)
        e = found[0]
        label = "answers" if e.positive else "was wrongly answered by"
        detail = f"Example **{e.id}**: “{html.escape(e.query)}” {label} `{html.escape(e.entry_id)}` ({e.source})"
        return e.id, detail, gr.update(interactive=True)

    def remove_example(example_id: int | None, *filter_values: Any) -> tuple[Any, ...]:
        if example_id is None:
            return ("Select an example first.", *refresh_examples(*filter_values))
        removed = kb.forget([int(example_id)])
        note = f"🗑️ Removed example {example_id}." if removed else "It was removed already."
        return (note, *refresh_examples(*filter_values))

    def export_examples() -> Any:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
        path = Path(tempfile.mkdtemp(prefix="supportbot-export-")) / f"examples-{stamp}.csv"
        learning.export_examples_csv(kb, path)
        return gr.update(value=str(path), visible=True)

    def show_conversations(needle: str) -> tuple[Any, ...]:
        found = store.conversations(limit=200, text=(needle or "").strip())
        rows = [
            [
                c["id"][:8],
                c["created_at"][:16].replace("T", " "),
                c["channel"],
                c["messages"],
                _short(c["first_question"] or "", 100),
            ]
            for c in found
        ]
        return (
            found,
            pd.DataFrame(rows, columns=CONVERSATION_COLUMNS),
            [],
            transcript_table([]),
            gr.update(visible=False),
        )

    def open_conversation(found: list[dict[str, Any]], data: gr.SelectData) -> tuple[Any, ...]:
        row = _row_index(data)
        if not found or row is None or row >= len(found):
            return [], transcript_table([]), gr.update(visible=False)
        messages = store.history(found[row]["id"], limit=1000)
        return [m.to_dict() for m in messages], transcript_table(messages), gr.update(visible=False)

    def pick_turn(messages: list[dict[str, Any]], data: gr.SelectData) -> tuple[Any, ...]:
        row = _row_index(data)
        if not messages or row is None or row >= len(messages):
            return None, gr.update(visible=False), "", gr.update(), ""
        chosen = store.get_message(int(messages[row]["id"]))
        question = learning.question_of(store, chosen)
        if not question:
            return None, gr.update(visible=False), "", gr.update(), ""
        hits = kb.search(question, 5)
        choices = [(f"{h.entry.id} — {_short(h.entry.question, 80)}", h.entry.id) for h in hits]
        seen = {c[1] for c in choices}
        choices += [(f"{e.id} — {_short(e.question, 80)}", e.id) for e in kb.entries() if e.id not in seen]
        answered = f" · the bot cited `{html.escape(', '.join(chosen.sources))}`" if chosen.sources else ""
        detail = f"**Customer asked:** {html.escape(question)}{answered}"
        value = choices[0][1] if choices else None
        return chosen.id, gr.update(visible=True), detail, gr.update(choices=choices, value=value), ""

    def annotate_turn(message_id: int | None, entry_id: str | None) -> str:
        if message_id is None or not entry_id:
            return "Pick a turn and an entry first."
        try:
            example = learning.annotate(kb, store, int(message_id), entry_id)
        except SupportBotError as exc:
            return _error(exc)
        return f"✅ Learned: “{html.escape(example.query)}” → `{html.escape(entry_id)}` (example {example.id})."

    listed = [table, counts, picked, picked_text, remove_button]
    refresh_button.click(refresh_examples, filters, listed, api_visibility="private")
    for trigger in (text.submit, entry.submit, source.change, polarity.change):
        trigger(refresh_examples, filters, listed, api_visibility="private")
    table.select(pick_example, [table], [picked, picked_text, remove_button], api_visibility="private")
    remove_button.click(remove_example, [picked, *filters], [message, *listed], api_visibility="private")
    export_button.click(export_examples, None, [export_file], api_visibility="private")
    conv_outputs = [conversations_state, conversations, transcript_state, transcript, annotate_box]
    conv_button.click(show_conversations, [conv_text], conv_outputs, api_visibility="private")
    conv_text.submit(show_conversations, [conv_text], conv_outputs, api_visibility="private")
    conversations.select(
        open_conversation, [conversations_state], [transcript_state, transcript, annotate_box], api_visibility="private"
    )
    transcript.select(
        pick_turn,
        [transcript_state],
        [turn, annotate_box, turn_text, target, annotate_message],
        api_visibility="private",
    )
    annotate_button.click(annotate_turn, [turn, target], [annotate_message], api_visibility="private")
    return refresh_examples, filters, listed
