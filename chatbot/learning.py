"""Every resolution becomes a labelled example: the workflows behind the chat, the console, the API
and ``supportbot kb learn``.

Each function here turns one thing a customer or an operator did into exactly one
`knowledge_base.examples.LabelledExample` (customer wording -> the entry that answers it, or a
thumbs-down's "not this one"), redacting the wording with the conversation store's own rules first:
the knowledge base never receives raw personal data. A positive example is a learned phrasing of its
entry at once (`KnowledgeBase.learn`); the console's examples table and ``DELETE /api/kb/examples``
undo a wrong one with `KnowledgeBase.forget`.

| resolution | function | source |
|---|---|---|
| the customer clicks a clarify option | `record_clarify_choice` (called by the engine) | ``clarify`` |
| thumbs up / down on a ``faq`` or ``generated`` answer | `record_rating` (called by ``ChatEngine.feedback``) | ``thumbs_up`` / ``thumbs_down`` (negative) |
| the console: queued questions added as phrasings of an entry | `resolve_queue` | ``phrasing`` |
| the console: queued questions answered by a new entry | `resolve_queue` | ``assign`` |
| the console: a corrected answer, with the entry that answers it | `correct_answer` | ``correction`` |
| the console: a conversation turn annotated with the right entry | `annotate` | ``annotation`` |
| ``POST /api/kb/examples`` | `learn` | ``api`` |
| ``supportbot kb learn FILE.jsonl`` | `learn_file` | ``import`` |
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from chatbot.store import ConversationStore, StoredMessage
from knowledge_base.atomic import atomic_path
from knowledge_base.errors import NotFoundError, SupportBotError
from knowledge_base.examples import LabelledExample, learned_key, read_examples_file
from knowledge_base.export import spreadsheet_safe
from knowledge_base.kb import KnowledgeBase

__all__ = [
    "EXAMPLE_CSV_COLUMNS",
    "annotate",
    "correct_answer",
    "export_examples_csv",
    "learn",
    "learn_file",
    "question_of",
    "record_clarify_choice",
    "record_rating",
    "resolve_queue",
]

log = logging.getLogger(__name__)

EXAMPLE_CSV_COLUMNS = (
    "example_id",
    "created_at",
    "source",
    "positive",
    "entry_id",
    "query",
    "conversation_id",
    "message_id",
)


def learn(
    kb: KnowledgeBase,
    store: ConversationStore,
    query: str,
    entry_id: str,
    *,
    source: str,
    positive: bool = True,
    conversation_id: str | None = None,
    message_id: int | None = None,
) -> LabelledExample:
    """One example, its query redacted like the conversation log."""
    return kb.learn(
        store.redact(query),
        entry_id,
        source=source,
        positive=positive,
        conversation_id=conversation_id,
        message_id=message_id,
    )


def question_of(store: ConversationStore, message: StoredMessage) -> str:
    """The customer's question an assistant message answered (its resolved question, else the
    customer message before it); a customer message is its own question."""
    if message.role == "user":
        return message.text
    if message.question:
        return message.question
    before = [m for m in store.history(message.conversation_id, limit=1000) if m.id < message.id and m.role == "user"]
    return before[-1].text if before else ""


def record_clarify_choice(
    kb: KnowledgeBase, store: ConversationStore, conversation_id: str, message: str
) -> LabelledExample | None:
    """If the conversation's last answer was a clarify and ``message`` is one of its options (the
    chat page sends the option's question when clicked), the customer's original question is an
    example of that entry. Call before the new message is stored; None when it is not a choice."""
    last = store.history(conversation_id, limit=1)
    if not last or last[0].role != "assistant" or last[0].mode != "clarify" or not last[0].sources:
        return None
    clarify = last[0]
    chosen = learned_key(message)
    entry = next((e for e in kb.store.get_many(clarify.sources) if learned_key(e.question) == chosen), None)
    question = question_of(store, clarify)
    if entry is None or not question:
        return None
    if kb.examples(message_id=clarify.id, source="clarify"):
        return None  # the same choice clicked again: one example per clarify answer
    return learn(
        kb, store, question, entry.id, source="clarify", conversation_id=conversation_id, message_id=clarify.id
    )


def record_rating(kb: KnowledgeBase, store: ConversationStore, message_id: int, rating: str) -> LabelledExample | None:
    """A thumbs-up on a ``faq``/``generated`` answer is a positive example of its first cited
    entry, a thumbs-down a negative one. A later rating of the same answer replaces the earlier
    example (as it replaces the rating); the same rating again (a comment sent after it) adds none."""
    message = store.get_message(message_id)
    if message.role != "assistant" or message.mode not in ("faq", "generated") or not message.sources:
        return None
    source = "thumbs_up" if rating == "up" else "thumbs_down"
    earlier = [e for e in kb.examples(message_id=message_id) if e.source in ("thumbs_up", "thumbs_down")]
    same = [e for e in earlier if e.source == source]
    if same:
        return same[0]
    if earlier:
        kb.forget([e.id for e in earlier])
    question = question_of(store, message)
    if not question:
        return None
    return learn(
        kb,
        store,
        question,
        message.sources[0],
        source=source,
        positive=rating == "up",
        conversation_id=message.conversation_id,
        message_id=message_id,
    )


def resolve_queue(
    kb: KnowledgeBase, store: ConversationStore, item_ids: Sequence[int], entry_id: str, *, source: str
) -> tuple[int, list[LabelledExample]]:
    """Queued questions answered by ``entry_id``: one example per queue item (``phrasing``: they
    are other wordings of that entry; ``assign``: a new entry was written for them), then the items
    are resolved. Returns (items resolved, examples)."""
    kb.get(entry_id)  # NotFoundError before anything is written
    examples = [
        learn(
            kb,
            store,
            item.question,
            entry_id,
            source=source,
            conversation_id=item.conversation_id,
            message_id=item.message_id,
        )
        for item in store.unanswered_items(item_ids)
        if item.question.strip()
    ]
    return store.resolve_unanswered(item_ids, entry_id), examples


def correct_answer(
    kb: KnowledgeBase,
    store: ConversationStore,
    message_id: int,
    text: str,
    *,
    entry_id: str | None = None,
    editor: str = "",
) -> LabelledExample | None:
    """An operator's corrected answer; with ``entry_id`` (the entry that answers the question) the
    question is also an example of that entry."""
    if entry_id:
        kb.get(entry_id)
    store.add_correction(message_id, text, editor=editor)
    if not entry_id:
        return None
    message = store.get_message(message_id)
    return learn(
        kb,
        store,
        question_of(store, message),
        entry_id,
        source="correction",
        conversation_id=message.conversation_id,
        message_id=message_id,
    )


def annotate(kb: KnowledgeBase, store: ConversationStore, message_id: int, entry_id: str) -> LabelledExample:
    """An operator reading a transcript marks the entry that should have answered a turn (a
    customer message or the answer to it)."""
    message = store.get_message(message_id)
    question = question_of(store, message)
    if not question:
        raise NotFoundError(f"message {message_id} answers no customer question", fix="pick a customer's turn")
    return learn(
        kb,
        store,
        question,
        entry_id,
        source="annotation",
        conversation_id=message.conversation_id,
        message_id=message_id,
    )


def learn_file(kb: KnowledgeBase, store: ConversationStore, path: Path) -> list[LabelledExample]:
    """A team's own log of resolved questions (``{"query", "faq_id"}`` per line), all or nothing:
    every bad row is reported (file, line, fix) and nothing is learned unless all are good."""
    rows = read_examples_file(path, (e.id for e in kb.entries()), max_chars=kb.settings.max_question_chars)
    return kb.learn_many([(store.redact(query), entry_id) for query, entry_id in rows], source="import")


def export_examples_csv(kb: KnowledgeBase, path_or_file: Path | str | IO[str], *, excel_safe: bool = True) -> int:
    """Every labelled example as CSV (:data:`EXAMPLE_CSV_COLUMNS`, oldest first), next to the
    conversation export: ``message_id`` and ``conversation_id`` join the two. Returns the rows."""
    if isinstance(path_or_file, (str, Path)):
        with atomic_path(Path(path_or_file)) as tmp, tmp.open("w", encoding="utf-8", newline="") as fh:
            return _write_examples(kb, fh, excel_safe)
    return _write_examples(kb, path_or_file, excel_safe)


def _write_examples(kb: KnowledgeBase, fh: IO[str], excel_safe: bool) -> int:
    writer = csv.writer(fh)
    writer.writerow(EXAMPLE_CSV_COLUMNS)
    examples = kb.examples()[::-1]
    for e in examples:
        stamp = dt.datetime.fromtimestamp(e.created_at, dt.timezone.utc).isoformat(timespec="seconds")
        row = [e.id, stamp, e.source, int(e.positive), e.entry_id, e.query, e.conversation_id or "", e.message_id or ""]
        # every text cell: an entry id from an uploaded file can start with "=" as well as a query
        writer.writerow([spreadsheet_safe(c) if excel_safe and isinstance(c, str) else c for c in row])
    return len(examples)


def safe_record_rating(kb: KnowledgeBase, store: ConversationStore, message_id: int, rating: str) -> None:
    """`record_rating` for the chat: the customer's rating is stored already, and an example that
    cannot be made (its entry deleted since) must not turn the rating into an error."""
    try:
        record_rating(kb, store, message_id, rating)
    except SupportBotError as exc:
        log.warning("rating of message %s not learned: %s", message_id, exc.message)
