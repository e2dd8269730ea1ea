"""The customer chat page: a Gradio Blocks that only talks to the chat engine.

What a customer sees: suggested questions on the empty chat, answers that stream in, the FAQ
entries each answer comes from (folded away under "Sources"), "did you mean" buttons when the bot
is unsure between entries, a clearly marked hand-off to a person (with an optional field for an
e-mail or phone to be answered at, and the team's replies appearing in the chat while it is open),
thumbs up/down with an optional comment on every final answer, and "New conversation". The conversation id lives in the page's session
state (on the server), so each browser tab is its own conversation.

Security (docs/security.md): the conversations a browser starts belong to its ``sb-client`` cookie
(set by ``ui.security``; a client without cookies gets a token kept in its session state), and the
engine continues or rates them only with that token. Every message passes the server's one chat
rate limiter (``guards``), whichever Gradio route it came by (queue, ``/gradio_api/call/chat``…).

Mount it with the page style (theme, CSS, no footer links, all local: the server may be offline)::

    gr.mount_gradio_app(app, build_chat_page(engine), "/", **MOUNT_OPTIONS)

The callbacks below hold no business logic: they call ``engine.answer_stream``,
``engine.feedback`` and ``engine.suggested_questions`` and turn the results into chat messages.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator
from typing import Any

import gradio as gr
from gradio.components.chatbot import ExampleMessage

from knowledge_base.errors import SupportBotError
from ui.ratelimit import retry_after
from ui.security import CLIENT_COOKIE, Guards, new_client_token

__all__ = [
    "CSS",
    "HEAD",
    "MOUNT_OPTIONS",
    "answer_message",
    "build_chat_page",
    "new_session",
    "render_answer",
    "theme",
]

log = logging.getLogger(__name__)

#: Shown in place of an answer when the engine fails unexpectedly.
ERROR_TEXT = "Sorry, something went wrong on our side. Please try again in a moment."
HANDOFF_BADGE = "Passed to our support team"
#: The bubble while an answer is on its way (and while a generated draft is still being checked).
TYPING = "…"
FEEDBACK = ("Like", "Dislike")
OPERATOR_BADGE = "Support team"
#: Seconds between two looks for the team's replies while a hand-off is open.
REPLY_POLL_S = 4.0
MAX_SOURCE_CHARS = 600

CSS = """
.gradio-container { max-width: 880px !important; margin: 0 auto !important; }
#sb-header { align-items: center; gap: 8px; flex-wrap: nowrap; }
#sb-header h1 { margin: 0; font-size: 1.35rem; }
#sb-header p { margin: 2px 0 0; color: var(--body-text-color-subdued); font-size: 0.92rem; }
#sb-new { flex: 0 0 auto; min-width: 0; white-space: nowrap; }
#sb-chat { flex-grow: 1; min-height: 320px; }
#sb-input-row { align-items: stretch; gap: 8px; flex-wrap: nowrap; }
#sb-send { flex: 0 0 auto; min-width: 72px; }
#sb-feedback { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 6px 10px; }
#sb-feedback-row { align-items: stretch; gap: 8px; flex-wrap: nowrap; }
.sb-handoff { display: inline-block; background: #fff4e0; color: #7a4b00; border-left: 4px solid #f59e0b;
  border-radius: 6px; padding: 3px 10px; margin-bottom: 6px; font-weight: 600; font-size: 0.92em; }
details.sb-sources { margin-top: 10px; font-size: 0.88em; border-top: 1px solid var(--border-color-primary);
  padding-top: 6px; }
details.sb-sources summary { cursor: pointer; color: var(--body-text-color-subdued); }
details.sb-sources li { margin: 6px 0; }
.sb-source-answer { color: var(--body-text-color-subdued); }
.sb-contact { font-size: 0.92em; }
.sb-operator { display: inline-block; background: #e6f4ff; color: #0b4a7a; border-left: 4px solid #3b82f6;
  border-radius: 6px; padding: 3px 10px; font-weight: 600; font-size: 0.92em; }
#sb-contact-box { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 6px 10px; }
#sb-contact-row { align-items: stretch; gap: 8px; flex-wrap: nowrap; }
#sb-chat .examples { gap: 10px; }
#sb-chat .example { border: 1px solid var(--border-color-primary); border-radius: 14px;
  background: var(--background-fill-secondary); }
#sb-chat .example:hover { border-color: var(--color-accent); background: var(--color-accent-soft); }
#sb-chat .placeholder-content { padding: 0 18px; text-align: center; }
footer { display: none !important; }
@media (max-width: 640px) {
  #sb-header h1 { font-size: 1.1rem; }
  #sb-header p { display: none; }
  #sb-chat { min-height: 0; }
}
"""


def theme() -> gr.themes.Base:
    """A calm, friendly theme with system fonts only (no web-font downloads)."""
    return gr.themes.Soft(
        primary_hue="teal",
        secondary_hue="slate",
        neutral_hue="slate",
        radius_size="lg",
        font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )


#: Gradio scopes ``css`` to the app's content; the page padding around it needs a plain style tag.
HEAD = "<style>@media (max-width: 640px) { .gradio-container .main.app { padding: 8px 10px !important; } }</style>"

#: What ``gr.mount_gradio_app`` needs for this page (Gradio 6 takes theme and CSS at mount time);
#: ``ui.server`` reads it.
MOUNT_OPTIONS: dict[str, Any] = {"theme": theme(), "css": CSS, "head": HEAD}


# -- presentation (pure functions: tested without a browser) ---------------------------------------


def new_session() -> dict[str, Any]:
    """A tab's chat state: its conversation, the message id of each answer, pending feedback, and
    the client token its conversations belong to (the ``sb-client`` cookie, once known)."""
    return {"conversation_id": None, "message_ids": {}, "pending": None, "owner": None}


def _with_owner(session: dict[str, Any], request: Any) -> dict[str, Any]:
    """``session`` with its owner token: the browser's client cookie, else the one it has, else new.
    A different cookie than before (cleared cookies, another browser) starts a new conversation."""
    cookies = (getattr(request, "cookies", None) or {}) if request is not None else {}
    owner = cookies.get(CLIENT_COOKIE) or session.get("owner") or new_client_token()
    if owner != session.get("owner"):
        session = {**session, "owner": owner, "conversation_id": None, "message_ids": {}, "pending": None}
    return session


def _sources_block(citations: list[dict[str, Any]], *, generated: bool = False) -> str:
    items = []
    for c in citations:
        answer = str(c.get("answer", ""))
        if len(answer) > MAX_SOURCE_CHARS:
            answer = answer[:MAX_SOURCE_CHARS].rsplit(" ", 1)[0] + " …"
        items.append(
            f"<li><strong>{html.escape(str(c.get('question', '')))}</strong>"
            f"<br><span class='sb-source-answer'>{html.escape(answer)}</span></li>"
        )
    label = "Source" if len(citations) == 1 else f"Sources ({len(citations)})"
    if generated:  # say so when the wording is the model's, not the FAQ's own
        label += " · answer written by AI from " + ("this article" if len(citations) == 1 else "these articles")
    return f"<details class='sb-sources'><summary>{label}</summary><ul>{''.join(items)}</ul></details>"


def render_answer(answer: Any, *, handoff_contact: str = "") -> str:
    """The chat bubble of a finished answer: text, hand-off badge, folded sources."""
    parts = []
    if answer.mode == "handoff":
        parts.append(f"<span class='sb-handoff'>🙋 {HANDOFF_BADGE}</span>\n")
    parts.append(answer.text.strip())
    if answer.mode == "handoff" and handoff_contact and handoff_contact.strip() not in answer.text:
        parts.append(f"<span class='sb-contact'>{html.escape(handoff_contact.strip())}</span>")
    citations = [c for c in (answer.citations or []) if c.get("question")]
    if citations and answer.mode in ("faq", "generated"):
        parts.append(_sources_block(citations, generated=answer.mode == "generated"))
    return "\n\n".join(parts)


def answer_message(answer: Any, *, handoff_contact: str = "") -> dict[str, Any]:
    """The chat message of a finished answer; clarify options become clickable buttons."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": render_answer(answer, handoff_contact=handoff_contact),
    }
    if answer.mode == "clarify" and answer.options:
        message["options"] = [
            {"value": str(o["question"]), "label": str(o["question"])} for o in answer.options if o.get("question")
        ]
    return message


def operator_message(text: str) -> str:
    """A reply from the support team, marked as coming from a person."""
    return f"<span class='sb-operator'>👤 {OPERATOR_BADGE}</span>\n\n{html.escape(text)}"


def in_progress(history: list[dict[str, Any]]) -> Any:
    """The chat while an answer is being written: no thumbs on any message."""
    return gr.update(value=[*history], feedback_options=[])


def finished(history: list[dict[str, Any]]) -> Any:
    """The chat with its final answer: thumbs back on."""
    return gr.update(value=[*history], feedback_options=list(FEEDBACK))


def _examples(questions: list[str]) -> list[ExampleMessage]:
    return [{"text": q, "display_text": q} for q in questions]


def _hidden_feedback() -> tuple[Any, Any]:
    return gr.update(visible=False), gr.update(value="")


# -- the page --------------------------------------------------------------------------------------


def build_chat_page(
    engine: Any,
    guards: Guards | None = None,
    *,
    title: str = "Customer support",
    intro: str = "Ask a question and I'll answer from our help centre, or pass you to a person.",
    suggestions: int = 4,
) -> gr.Blocks:
    """The public chat page for ``engine`` (a :class:`chatbot.engine.ChatEngine`). ``guards``: the
    server's shared limits (``ui.security``); without them messages are not rate-limited."""
    contact = str(getattr(getattr(engine.settings, "policy", None), "handoff_message", "") or "")

    def suggested() -> list[str]:
        try:
            return list(engine.suggested_questions(suggestions))
        except Exception:  # suggestions are a nicety; the page must load without them
            log.exception("suggested questions failed")
            return []

    def respond(
        message: str, history: list[dict[str, Any]], session: dict[str, Any], request: gr.Request | None = None
    ) -> Iterator[Any]:
        message = (message or "").strip()
        session = _with_owner(session or new_session(), request)
        if not message:
            yield "", history, session, *_hidden_feedback()
            return
        if guards is not None and request is not None:
            wait = guards.chat_limiter.acquire(guards.client_of(request))
            if wait > 0:
                raise gr.Error(f"You are sending messages too quickly. Please try again in {retry_after(wait)} s.")
        # No thumbs while an answer is being written: a rating belongs to a final answer. They go
        # first, with the question alone: Gradio may render a new message before it applies the
        # props of the same update (a browser test saw thumbs flash on the "…" bubble).
        history = [*history, {"role": "user", "content": message}]
        yield "", in_progress(history), session, *_hidden_feedback()
        history = [*history, {"role": "assistant", "content": TYPING}]
        yield gr.skip(), in_progress(history), session, gr.skip(), gr.skip()
        streamed = ""
        try:
            events = engine.answer_stream(message, session.get("conversation_id"), client="web", owner=session["owner"])
            for event in events:
                if event.kind == "delta" and event.text:
                    # Only guard-checked text arrives here (chatbot.guarded_stream).
                    streamed += event.text
                    history[-1] = {"role": "assistant", "content": streamed + " ▍"}
                    yield gr.skip(), in_progress(history), session, gr.skip(), gr.skip()
                elif event.kind == "done" and event.answer is not None:
                    answer = event.answer
                    history[-1] = answer_message(answer, handoff_contact=contact)
                    session = {
                        **session,
                        "conversation_id": answer.conversation_id,
                        "message_ids": {**session.get("message_ids", {}), str(len(history) - 1): answer.message_id},
                    }
                    if answer.ticket_id is not None:  # a person takes over: offer a contact, poll for replies
                        session["ticket_id"] = answer.ticket_id
                    # The final text first, the thumbs after: in one update Gradio may show the new
                    # props on the old text (a browser test saw thumbs beside the typing cursor).
                    yield gr.skip(), in_progress(history), session, gr.skip(), gr.skip()
                    yield gr.skip(), finished(history), session, gr.skip(), gr.skip()
        except SupportBotError as exc:
            history[-1] = {"role": "assistant", "content": html.escape(exc.message)}
            yield gr.skip(), finished(history), session, gr.skip(), gr.skip()
        except Exception:
            log.exception("chat answer failed")
            history[-1] = {"role": "assistant", "content": ERROR_TEXT}
            yield gr.skip(), finished(history), session, gr.skip(), gr.skip()

    def rate(session: dict[str, Any], data: gr.LikeData) -> tuple[Any, ...]:
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        message_id = (session or {}).get("message_ids", {}).get(str(index))
        if message_id is None or data.liked not in (True, False):
            return session, gr.update(visible=False), gr.skip(), gr.skip()
        rating = "up" if data.liked is True else "down"
        engine.feedback(int(message_id), rating, owner=session.get("owner"))
        prompt = (
            "Thanks! Anything to add? *(optional)*"
            if rating == "up"
            else "Sorry about that. What was wrong or missing? *(optional)*"
        )
        session = {**session, "pending": {"message_id": int(message_id), "rating": rating}}
        return session, gr.update(visible=True), gr.update(value=prompt), gr.update(value="")

    def send_comment(comment: str, session: dict[str, Any]) -> tuple[Any, ...]:
        pending = (session or {}).get("pending")
        if pending and (comment or "").strip():
            engine.feedback(pending["message_id"], pending["rating"], comment.strip(), owner=session.get("owner"))
            gr.Info("Thanks for your feedback!")
        return {**(session or new_session()), "pending": None}, *_hidden_feedback()

    def close_comment(session: dict[str, Any]) -> tuple[Any, ...]:
        return {**(session or new_session()), "pending": None}, *_hidden_feedback()

    ask_contact = bool(getattr(getattr(engine.settings, "handoff", None), "ask_contact", False))

    def after_answer(session: dict[str, Any]) -> tuple[Any, ...]:
        """After a hand-off: the optional contact field, and polling for the team's replies."""
        handed_off = bool((session or {}).get("ticket_id"))
        show = handed_off and ask_contact and not session.get("contact_given")
        return gr.update(visible=show), gr.Timer(active=handed_off)

    def send_contact(value: str, session: dict[str, Any]) -> tuple[Any, ...]:
        session = session or new_session()
        try:
            ticket = engine.handoff.add_contact(str(session.get("conversation_id") or ""), value)
        except SupportBotError as exc:
            return session, gr.skip(), f"⚠️ {html.escape(exc.message)}. {html.escape(exc.fix or '')}"
        gr.Info(f"Thanks! Our team will reply to {ticket.contact}.")
        return {**session, "contact_given": True}, gr.update(visible=False), ""

    def poll_replies(history: list[dict[str, Any]], session: dict[str, Any]) -> tuple[Any, ...]:
        """The team's replies that this chat has not shown yet (the page polls while a ticket is open)."""
        cid = (session or {}).get("conversation_id")
        if not cid:
            return gr.skip(), gr.skip()
        replies = engine.handoff.replies(cid, after=int(session.get("last_reply", 0)))
        if not replies:
            return gr.skip(), gr.skip()
        history = [*history, *({"role": "assistant", "content": operator_message(r.text)} for r in replies)]
        return history, {**session, "last_reply": replies[-1].id}

    def restart(session: dict[str, Any] | None = None) -> tuple[Any, ...]:
        return [], {**new_session(), "owner": (session or {}).get("owner")}, "", *_hidden_feedback()

    def on_load() -> Any:
        return gr.update(examples=_examples(suggested()))

    with gr.Blocks(title=title, fill_height=True, analytics_enabled=False) as page:
        session = gr.State(new_session())
        picked = gr.State("")
        with gr.Row(elem_id="sb-header", equal_height=True):
            gr.HTML(f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>", padding=False)
            new_button = gr.Button("New conversation", size="sm", variant="secondary", elem_id="sb-new", scale=0)
        chatbot = gr.Chatbot(
            elem_id="sb-chat",
            show_label=False,
            height="70vh",
            scale=1,
            layout="bubble",
            buttons=["copy"],
            feedback_options=FEEDBACK,
            placeholder=f"### 👋 Hi there!\n{intro}",
            examples=_examples(suggested()),
            autoscroll=True,
        )
        with gr.Column(visible=False, elem_id="sb-feedback") as feedback_box:
            feedback_prompt = gr.Markdown("Thanks! Anything to add? *(optional)*")
            with gr.Row(elem_id="sb-feedback-row"):
                comment = gr.Textbox(
                    show_label=False, placeholder="Your comment", lines=1, max_lines=4, scale=1, elem_id="sb-comment"
                )
                send_comment_button = gr.Button("Send", size="sm", scale=0, min_width=64, elem_id="sb-comment-send")
                skip_button = gr.Button("Skip", size="sm", scale=0, min_width=56, variant="secondary")
        with gr.Column(visible=False, elem_id="sb-contact-box") as contact_box:
            contact_prompt = str(getattr(getattr(engine.settings, "handoff", None), "contact_prompt", ""))
            gr.Markdown(contact_prompt)
            with gr.Row(elem_id="sb-contact-row"):
                contact_input = gr.Textbox(
                    show_label=False,
                    placeholder="you@example.com or +1 555 0100",
                    lines=1,
                    scale=1,
                    elem_id="sb-contact",
                )
                contact_button = gr.Button("Send", size="sm", scale=0, min_width=64, elem_id="sb-contact-send")
            contact_error = gr.Markdown()
        replies_timer = gr.Timer(REPLY_POLL_S, active=False)
        with gr.Row(elem_id="sb-input-row"):
            textbox = gr.Textbox(
                show_label=False,
                placeholder="Type your question…",
                lines=1,
                max_lines=5,
                scale=1,
                autofocus=True,
                submit_btn=False,
                elem_id="sb-input",
            )
            send_button = gr.Button("Send", variant="primary", scale=0, min_width=72, elem_id="sb-send")

        outputs = [textbox, chatbot, session, feedback_box, comment]
        chat_args: dict[str, Any] = {"concurrency_limit": None, "show_progress": "hidden"}
        private: dict[str, Any] = {"api_visibility": "private"}
        handoff_outputs = [contact_box, replies_timer]
        textbox.submit(respond, [textbox, chatbot, session], outputs, api_name="chat", **chat_args).then(
            after_answer, [session], handoff_outputs, **private
        )
        send_button.click(respond, [textbox, chatbot, session], outputs, **private, **chat_args).then(
            after_answer, [session], handoff_outputs, **private
        )
        contact_outputs = [session, contact_box, contact_error]
        contact_button.click(send_contact, [contact_input, session], contact_outputs, **private)
        contact_input.submit(send_contact, [contact_input, session], contact_outputs, **private)
        replies_timer.tick(poll_replies, [chatbot, session], [chatbot, session], queue=False, **private)

        def pick(data: gr.SelectData) -> str:
            value = data.value
            return str(value.get("text", "") if isinstance(value, dict) else value)

        for event in (chatbot.example_select, chatbot.option_select):
            event(pick, None, picked, queue=False, api_visibility="private").then(
                respond, [picked, chatbot, session], outputs, api_visibility="private", **chat_args
            ).then(after_answer, [session], handoff_outputs, **private)
        chatbot.like(rate, [session], [session, feedback_box, feedback_prompt, comment], api_visibility="private")
        comment_outputs = [session, feedback_box, comment]
        send_comment_button.click(send_comment, [comment, session], comment_outputs, api_visibility="private")
        comment.submit(send_comment, [comment, session], comment_outputs, api_visibility="private")
        skip_button.click(close_comment, [session], comment_outputs, api_visibility="private")
        reset_outputs = [chatbot, session, textbox, feedback_box, comment]
        new_button.click(restart, [session], reset_outputs, api_visibility="private", queue=False).then(
            after_answer, [session], handoff_outputs, **private
        )
        chatbot.clear(restart, [session], reset_outputs, api_visibility="private", queue=False).then(
            after_answer, [session], handoff_outputs, **private
        )
        page.load(on_load, None, chatbot, api_visibility="private", queue=False)
    return page
