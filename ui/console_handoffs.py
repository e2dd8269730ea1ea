"""The console's "Hand-offs" tab: the queue of questions the bot passed to a person.

List the tickets (open / answered / closed), open one to read the conversation with the contact the
customer left, reply (the reply appears in the customer's chat while it is open), close or reopen.
Callbacks only call `chatbot.handoff` (the engine's ``handoff``).
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from knowledge_base.errors import SupportBotError

__all__ = ["QUEUE_COLUMNS", "build_handoffs_tab", "queue_table"]

QUEUE_COLUMNS = ["ticket", "opened", "status", "contact", "question"]
STATUSES = ["Open", "Answered", "Closed", "All"]


def queue_table(tickets: list[Any]) -> pd.DataFrame:
    rows = [
        [t.id, t.created_at[:16].replace("T", " "), t.status, t.contact or "—", " ".join(t.question.split())[:160]]
        for t in tickets
    ]
    return pd.DataFrame(rows, columns=QUEUE_COLUMNS)


def _transcript_markdown(ticket: Any, turns: list[dict[str, Any]]) -> str:
    contact = f"{html.escape(ticket.contact)} ({ticket.contact_kind})" if ticket.contact else "none left"
    lines = [f"### Ticket #{ticket.id} · {ticket.status}", f"**Contact for a reply:** {contact}", ""]
    for turn in turns:
        mode = f" · *{turn['mode']}*" if turn["mode"] and turn["who"] == "bot" else ""
        text = html.escape(" ".join(str(turn["text"]).split()))
        lines.append(f"**{html.escape(turn['who'])}** ({turn['when'][11:16]} UTC{mode}): {text}")
        lines.append("")
    return "\n".join(lines)


def build_handoffs_tab(engine: Any) -> tuple[Any, list[Any], list[Any]]:
    """The tab's components and callbacks; returns (load function, its inputs, its outputs)."""
    handoff = engine.handoff
    gr.Markdown(
        "Every hand-off opens a ticket with its conversation. Reply here: the customer sees the reply "
        "in their chat while it is open; use the contact they left otherwise. Notifications of new "
        "tickets go to the webhook and e-mail configured under `[handoff]`."
    )
    with gr.Row():
        status = gr.Radio(STATUSES, value="Open", label="Status", scale=3)
        refresh_button = gr.Button("Refresh", scale=1)
    counts = gr.Markdown()
    table = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=False, wrap=True, max_height=360, elem_id="sb-tickets")
    picked = gr.State(None)
    transcript = gr.Markdown("Click a ticket to open it.")
    with gr.Group(visible=False) as reply_box:
        reply_text = gr.Textbox(label="Reply to the customer", lines=3, elem_id="sb-ticket-reply")
        with gr.Row():
            send_button = gr.Button("Send reply", variant="primary")
            close_button = gr.Button("Close ticket", variant="secondary")
            reopen_button = gr.Button("Reopen", variant="secondary")
    message = gr.Markdown()

    def refresh_tickets(choice: str) -> tuple[Any, ...]:
        wanted = None if choice == "All" else choice.lower()
        tickets = handoff.queue(wanted)
        n = handoff.tickets.counts()
        summary = f"**{n['open']}** open · **{n['answered']}** answered · **{n['closed']}** closed"
        return queue_table(tickets), summary

    def show(ticket_id: int | None) -> tuple[Any, ...]:
        if ticket_id is None:
            return "Click a ticket to open it.", gr.update(visible=False)
        ticket = handoff.tickets.get(ticket_id)
        return _transcript_markdown(ticket, handoff.transcript(ticket_id)), gr.update(visible=True)

    def pick_ticket(frame: pd.DataFrame, data: gr.SelectData) -> tuple[Any, ...]:
        row = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if row is None or row >= len(frame):
            return None, *show(None), ""
        ticket_id = int(frame.iloc[row]["ticket"])
        return ticket_id, *show(ticket_id), ""

    def act(action: str, ticket_id: int | None, text: str, choice: str, request: gr.Request) -> tuple[Any, ...]:
        if ticket_id is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), "Open a ticket first."
        try:
            if action == "reply":
                handoff.reply(ticket_id, text, operator=getattr(request, "username", "") or "")
                done = "✅ Reply sent: the customer sees it in their chat if it is still open."
            elif action == "close":
                handoff.close(ticket_id)
                done = f"Ticket #{ticket_id} closed."
            else:
                handoff.reopen(ticket_id)
                done = f"Ticket #{ticket_id} reopened."
        except SupportBotError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc.message}. {exc.fix or ''}"
        frame, summary = refresh_tickets(choice)
        shown, box = show(ticket_id)
        return frame, summary, shown, box, "" if action == "reply" else gr.skip(), done

    def send(ticket_id: int | None, text: str, choice: str, request: gr.Request) -> tuple[Any, ...]:
        return act("reply", ticket_id, text, choice, request)

    def close(ticket_id: int | None, text: str, choice: str, request: gr.Request) -> tuple[Any, ...]:
        return act("close", ticket_id, text, choice, request)

    def reopen(ticket_id: int | None, text: str, choice: str, request: gr.Request) -> tuple[Any, ...]:
        return act("reopen", ticket_id, text, choice, request)

    listed = [table, counts]
    private: dict[str, Any] = {"api_visibility": "private"}
    refresh_button.click(refresh_tickets, [status], listed, **private)
    status.change(refresh_tickets, [status], listed, **private)
    table.select(pick_ticket, [table], [picked, transcript, reply_box, message], **private)
    acted = [table, counts, transcript, reply_box, reply_text, message]
    send_button.click(send, [picked, reply_text, status], acted, api_name="reply_ticket", **private)
    close_button.click(close, [picked, reply_text, status], acted, api_name="close_ticket", **private)
    reopen_button.click(reopen, [picked, reply_text, status], acted, api_name="reopen_ticket", **private)
    return refresh_tickets, [status], listed
