"""The conversation store: round trips, feedback loop, analytics, export, migrations, threads, PII."""

from __future__ import annotations

import csv
import io
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from chatbot.store import (
    CSV_COLUMNS,
    SCHEMA_VERSION,
    ConversationStore,
    StoredMessage,
    TrainingPair,
)
from knowledge_base.errors import NotFoundError, SupportBotError

EMAIL = "jane.doe@example.com"
PHONE = "+1 (555) 123-4567"
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"


class Clock:
    """A settable UTC clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ConversationStore]:
    s = ConversationStore(tmp_path / "conversations.sqlite3")
    yield s
    s.close()


def _answer(store: ConversationStore, cid: str, question: str, answer: str, **kw: Any) -> int:
    store.add_message(cid, "user", question)
    return store.add_message(cid, "assistant", answer, question=question, **kw)


# -- messages ---------------------------------------------------------------------------------------


def test_message_round_trips_with_all_fields(store: ConversationStore) -> None:
    cid = store.create_conversation(client="widget-1", channel="api")
    assert len(cid) == 32 and int(cid, 16) >= 0
    assert store.conversation_exists(cid)
    assert not store.conversation_exists("nope")
    user_id = store.add_message(cid, "user", "how long does shipping take")
    mid = store.add_message(
        cid,
        "assistant",
        "3-5 business days.",
        mode="faq",
        sources=["shipping-times", "express-shipping"],
        scores=[0.91, 0.42],
        latency_ms=12.5,
        model="smollm2-135m-instruct",
        adapter="support-v2",
        question="How long does shipping take?",
    )
    assert mid > user_id
    msg = store.get_message(mid)
    assert msg == StoredMessage(
        id=mid,
        conversation_id=cid,
        role="assistant",
        text="3-5 business days.",
        created_at=msg.created_at,
        mode="faq",
        sources=["shipping-times", "express-shipping"],
        scores=[0.91, 0.42],
        latency_ms=12.5,
        model="smollm2-135m-instruct",
        adapter="support-v2",
        question="How long does shipping take?",
    )
    created = datetime.fromisoformat(msg.created_at)
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=5)
    user = store.get_message(user_id)
    assert (user.role, user.mode, user.sources, user.scores, user.latency_ms, user.question) == (
        "user",
        None,
        [],
        [],
        None,
        None,
    )


def test_history_is_oldest_first_and_keeps_the_last_n(store: ConversationStore) -> None:
    cid = store.create_conversation()
    other = store.create_conversation()
    for i in range(30):
        store.add_message(cid, "user" if i % 2 == 0 else "assistant", f"message {i}")
        store.add_message(other, "user", f"other {i}")
    assert [m.text for m in store.history(cid)] == [f"message {i}" for i in range(10, 30)]
    assert [m.text for m in store.history(cid, limit=3)] == ["message 27", "message 28", "message 29"]
    assert len(store.history(cid, limit=100)) == 30
    assert store.history(cid, limit=0) == []
    assert store.history("unknown-conversation") == []


def test_bad_messages_are_refused(store: ConversationStore) -> None:
    cid = store.create_conversation()
    with pytest.raises(NotFoundError) as err:
        store.add_message("missing", "user", "hi")
    assert err.value.fix
    with pytest.raises(SupportBotError, match="role"):
        store.add_message(cid, "system", "hi")
    with pytest.raises(SupportBotError, match="mode"):
        store.add_message(cid, "assistant", "hi", mode="guess")
    with pytest.raises(NotFoundError) as missing:
        store.get_message(999)
    assert "999" in str(missing.value) and missing.value.fix


# -- feedback ---------------------------------------------------------------------------------------


def test_feedback_replaces_and_rejects_user_messages_and_unknown_ids(store: ConversationStore) -> None:
    cid = store.create_conversation()
    user_id = store.add_message(cid, "user", "where is my parcel")
    mid = store.add_message(cid, "assistant", "Tracking is in your e-mail.", mode="faq", sources=["tracking"])
    first = store.add_feedback(mid, "down", "not helpful")
    second = store.add_feedback(mid, "up")
    assert first == second
    assert [r["message_id"] for r in store.low_rated()] == []
    assert store.stats()["feedback"] == {"up": 1, "down": 0}
    store.add_feedback(mid, "down", "still lost")
    assert [(r["message_id"], r["comment"]) for r in store.low_rated()] == [(mid, "still lost")]

    with pytest.raises(NotFoundError) as user_err:
        store.add_feedback(user_id, "up")
    assert user_err.value.fix
    with pytest.raises(NotFoundError):
        store.add_feedback(12345, "up")
    with pytest.raises(SupportBotError, match="rating"):
        store.add_feedback(mid, "meh")
    with pytest.raises(NotFoundError):
        store.add_correction(user_id, "a better answer")


def test_low_rated_lists_what_the_team_needs(store: ConversationStore) -> None:
    cid = store.create_conversation()
    good = _answer(store, cid, "Do you ship abroad?", "Yes, to 30 countries.", mode="faq", sources=["intl"])
    bad = _answer(store, cid, "Can I pay by invoice?", "Yes.", mode="generated", sources=["payment"], scores=[0.5])
    store.add_message(cid, "user", "no question field on this one")
    unlabelled = store.add_message(cid, "assistant", "Maybe.", mode="generated")
    store.add_feedback(good, "up")
    store.add_feedback(bad, "down", "we don't offer invoices")
    store.add_feedback(unlabelled, "down")
    store.add_correction(bad, "No, we accept cards and PayPal only.", editor="ana")
    rows = store.low_rated()
    assert [r["message_id"] for r in rows] == [unlabelled, bad]  # most recently rated first
    bad_row = rows[1]
    assert bad_row["question"] == "Can I pay by invoice?"
    assert bad_row["answer"] == "Yes."
    assert bad_row["comment"] == "we don't offer invoices"
    assert bad_row["sources"] == ["payment"] and bad_row["scores"] == [0.5]
    assert bad_row["mode"] == "generated"
    assert bad_row["correction"] == "No, we accept cards and PayPal only."
    assert bad_row["created_at"] and bad_row["rated_at"]
    assert rows[0]["question"] == "no question field on this one"  # falls back to the customer's message
    assert rows[0]["correction"] is None
    assert len(store.low_rated(limit=1)) == 1


# -- the unanswered queue ---------------------------------------------------------------------------


def test_unanswered_queue_open_resolved_dismissed(store: ConversationStore) -> None:
    cid = store.create_conversation()
    mid = store.add_message(cid, "assistant", "Let me get a human.", mode="handoff")
    a = store.add_unanswered(
        "Do you sell gift cards?", conversation_id=cid, message_id=mid, top_score=0.21, reason="handoff"
    )
    b = store.add_unanswered(
        "gift card balance?", conversation_id=None, message_id=None, top_score=None, reason="handoff"
    )
    c = store.add_unanswered("asdfgh", conversation_id=None, message_id=None, top_score=0.01, reason="handoff")
    assert store.add_unanswered("again", conversation_id=cid, message_id=mid, top_score=0.2, reason="handoff") == a
    d = store.add_unanswered(
        "Do you sell gift cards?", conversation_id=cid, message_id=mid, top_score=0.2, reason="thumbs_down"
    )
    assert d != a

    open_items = store.unanswered()
    assert [q.id for q in open_items] == [d, c, b, a]  # newest first
    first = open_items[-1]
    assert (first.question, first.status, first.reason, first.top_score) == (
        "Do you sell gift cards?",
        "open",
        "handoff",
        0.21,
    )
    assert (first.conversation_id, first.message_id, first.resolved_entry_id) == (cid, mid, None)

    assert store.resolve_unanswered([a, b, d], "gift-cards") == 3
    assert store.dismiss_unanswered([c, 9999]) == 1
    assert store.unanswered() == []
    resolved = store.unanswered(status="resolved")
    assert {q.id for q in resolved} == {a, b, d}
    assert {q.resolved_entry_id for q in resolved} == {"gift-cards"}
    assert [q.id for q in store.unanswered(status="dismissed")] == [c]
    assert len(store.unanswered(status="all")) == 4
    assert len(store.unanswered(status="all", limit=2)) == 2
    with pytest.raises(SupportBotError):
        store.unanswered(status="closed")
    with pytest.raises(SupportBotError):
        store.resolve_unanswered([a], "")
    # a resolved item is no longer "open", so the same answer can be queued again
    assert store.add_unanswered("x", conversation_id=cid, message_id=mid, top_score=None, reason="handoff") not in (
        a,
        b,
        c,
        d,
    )


# -- training pairs ---------------------------------------------------------------------------------


def test_training_pairs_from_thumbs_up_and_corrections(store: ConversationStore) -> None:
    cid = store.create_conversation()
    faq_up = _answer(store, cid, "How do I return an item?", "Use the returns portal.", mode="faq", sources=["returns"])
    gen_down = _answer(store, cid, "Is the jacket waterproof?", "It is warm.", mode="generated", sources=["jacket"])
    gen_fixed = _answer(store, cid, "Do you price-match?", "Sometimes.", mode="generated", sources=["prices"])
    handoff_up = _answer(store, cid, "I want to speak to someone", "Connecting you to a person.", mode="handoff")
    handoff_fixed = _answer(store, cid, "Do you sell gift cards?", "Let me get a human.", mode="handoff")
    clarify_up = _answer(store, cid, "delivery", "Did you mean shipping times or tracking?", mode="clarify")
    gen_up = _answer(
        store, cid, "Can I change my address?", "Yes, before it ships.", mode="generated", sources=["address"]
    )
    no_feedback = _answer(store, cid, "Hi", "Hello!", mode="faq", sources=["greeting"])

    store.add_feedback(faq_up, "up")
    store.add_feedback(gen_down, "down", "wrong")
    store.add_feedback(gen_fixed, "down")
    store.add_correction(gen_fixed, "We don't price-match.", editor="ana")
    store.add_correction(gen_fixed, "We do not price-match, but we run sales every month.", editor="bo")
    store.add_feedback(handoff_up, "up")
    store.add_correction(handoff_fixed, "Yes, gift cards from 10 to 200 EUR are on the gift card page.")
    store.add_feedback(clarify_up, "up")
    store.add_feedback(gen_up, "up")

    pairs = store.training_pairs()
    assert pairs == [
        TrainingPair("How do I return an item?", "Use the returns portal.", ["returns"], "thumbs_up", faq_up),
        TrainingPair(
            "Do you price-match?",
            "We do not price-match, but we run sales every month.",
            ["prices"],
            "correction",
            gen_fixed,
        ),
        TrainingPair(
            "Do you sell gift cards?",
            "Yes, gift cards from 10 to 200 EUR are on the gift card page.",
            [],
            "correction",
            handoff_fixed,
        ),
        TrainingPair("Can I change my address?", "Yes, before it ships.", ["address"], "thumbs_up", gen_up),
    ]
    ids = {p.message_id for p in pairs}
    assert not ids & {gen_down, handoff_up, clarify_up, no_feedback}
    with pytest.raises(SupportBotError):
        store.add_correction(gen_down, "   ")


# -- analytics --------------------------------------------------------------------------------------


def test_stats_on_a_known_small_set(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 11, 19, 9, 30, tzinfo=timezone.utc))
    with ConversationStore(tmp_path / "c.sqlite3", clock=clock) as store:
        old = datetime(2026, 10, 1, 12, tzinfo=timezone.utc)  # outside a 30-day window
        clock.now = old
        cid = store.create_conversation()
        _answer(store, cid, "old", "old answer", mode="faq", sources=["A"], latency_ms=9999)

        clock.now = datetime(2026, 11, 19, 10, tzinfo=timezone.utc)
        cid = store.create_conversation()
        a1 = _answer(store, cid, "q1", "a1", mode="faq", sources=["A", "B"], latency_ms=100)
        _answer(store, cid, "q2", "a2", mode="faq", sources=["A"], latency_ms=200)
        _answer(store, cid, "q3", "a3", mode="generated", sources=["B", "A"], latency_ms=300)
        _answer(store, cid, "q4", "a4", mode="handoff", latency_ms=400)
        store.add_feedback(a1, "up")

        clock.now = datetime(2026, 11, 20, 23, 59, tzinfo=timezone.utc)
        cid2 = store.create_conversation()
        b1 = _answer(store, cid2, "q5", "a5", mode="clarify", sources=["C", "D"], latency_ms=50)
        b2 = _answer(store, cid2, "q6", "a6", mode="faq", sources=["B"], latency_ms=150)
        _answer(store, cid2, "q7", "a7", mode="handoff", latency_ms=250)
        _answer(store, cid2, "q8", "a8", mode="handoff", latency_ms=350)
        store.add_feedback(b1, "down")
        store.add_feedback(b2, "up")
        store.add_unanswered("q7", conversation_id=cid2, message_id=None, top_score=0.1, reason="handoff")

        stats = store.stats(days=30)
        assert (stats["since"], stats["until"]) == ("2026-10-22", "2026-11-20")
        assert len(stats["per_day"]) == 30
        assert [d["date"] for d in stats["per_day"][-2:]] == ["2026-11-19", "2026-11-20"]
        assert all(d["questions"] == 0 and d["handoff_rate"] is None for d in stats["per_day"][:-2])

        day1, day2 = stats["per_day"][-2:]
        assert day1["questions"] == 4
        assert day1["by_mode"] == {"faq": 2, "clarify": 0, "generated": 1, "handoff": 1}
        assert day1["handoff_rate"] == pytest.approx(0.25)
        assert day1["latency_p50_ms"] == pytest.approx(250)  # 100 200 300 400
        assert day1["latency_p95_ms"] == pytest.approx(385)
        assert day2["by_mode"] == {"faq": 1, "clarify": 1, "generated": 0, "handoff": 2}
        assert day2["handoff_rate"] == pytest.approx(0.5)
        assert day2["latency_p50_ms"] == pytest.approx(200)  # 50 150 250 350
        assert day2["latency_p95_ms"] == pytest.approx(335)

        totals = stats["totals"]
        assert totals["questions"] == 8
        assert totals["by_mode"] == {"faq": 3, "clarify": 1, "generated": 1, "handoff": 3}
        assert totals["handoff_rate"] == pytest.approx(3 / 8)
        assert totals["latency_p50_ms"] == pytest.approx(225)
        assert totals["latency_p95_ms"] == pytest.approx(382.5)
        assert totals["conversations"] == 2
        # sources[0] of faq/generated answers only: A twice, B twice (the clarify's C is no hit)
        assert stats["most_hit_entries"] == [("A", 2), ("B", 2)]
        assert stats["feedback"] == {"up": 2, "down": 1}
        assert stats["unanswered_open"] == 1

        one_day = store.stats(days=1)
        assert [d["date"] for d in one_day["per_day"]] == ["2026-11-20"]
        assert one_day["totals"]["questions"] == 4
        assert one_day["most_hit_entries"] == [("B", 1)]
        assert one_day["feedback"] == {"up": 1, "down": 1}

        assert store.stats(days=90)["totals"]["questions"] == 9


def test_stats_on_an_empty_store(store: ConversationStore) -> None:
    stats = store.stats(days=7)
    assert len(stats["per_day"]) == 7
    assert stats["totals"]["questions"] == 0
    assert stats["totals"]["handoff_rate"] is None
    assert stats["totals"]["latency_p50_ms"] is None
    assert stats["most_hit_entries"] == []
    assert stats["feedback"] == {"up": 0, "down": 0}


# -- export -----------------------------------------------------------------------------------------


def test_csv_export_columns_and_rows(store: ConversationStore, tmp_path: Path) -> None:
    cid = store.create_conversation(channel="web")
    mid = _answer(
        store,
        cid,
        "=HYPERLINK('http://evil')",
        "Returns take 14 days.",
        mode="faq",
        sources=["returns", "refunds"],
        scores=[0.9, 0.3],
        latency_ms=42.0,
        model="smollm2",
        adapter="v1",
    )
    store.add_feedback(mid, "down", "too slow")
    store.add_correction(mid, "Returns take 14 days; refunds 3 more.")
    cid2 = store.create_conversation(channel="api")
    store.add_message(cid2, "user", 'a "quoted", multi\nline question')

    target = tmp_path / "out" / "log.csv"
    assert store.export_csv(target) == 3
    assert not list(target.parent.glob(".*.tmp"))  # the atomic write left no temp file
    with target.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert set(CSV_COLUMNS) >= {
        "conversation_id",
        "role",
        "text",
        "mode",
        "sources",
        "latency_ms",
        "model",
        "adapter",
        "feedback",
    }
    user, answer, other = rows
    assert user["role"] == "user" and user["text"] == "'=HYPERLINK('http://evil')"  # CSV injection defused
    assert user["feedback"] == "" and user["mode"] == ""
    assert answer["conversation_id"] == cid and answer["channel"] == "web"
    assert answer["message_id"] == str(mid)
    assert (answer["role"], answer["text"], answer["mode"]) == ("assistant", "Returns take 14 days.", "faq")
    assert answer["sources"] == '["returns", "refunds"]' and answer["scores"] == "[0.9, 0.3]"
    assert float(answer["latency_ms"]) == 42.0
    assert (answer["model"], answer["adapter"]) == ("smollm2", "v1")
    assert (answer["feedback"], answer["feedback_comment"]) == ("down", "too slow")
    assert answer["corrected_answer"] == "Returns take 14 days; refunds 3 more."
    assert other["text"] == 'a "quoted", multi\nline question' and other["channel"] == "api"

    buffer = io.StringIO()
    assert store.export_csv(buffer, excel_safe=False) == 3
    raw = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert raw[0]["text"] == "=HYPERLINK('http://evil')"


# -- migrations -------------------------------------------------------------------------------------

# The version-1 schema exactly as it shipped; written out here on purpose, so that an edit to a
# released migration (instead of a new one) breaks this test.
V1_SCHEMA = """
CREATE TABLE conversations (
    id TEXT PRIMARY KEY, created_at TEXT NOT NULL,
    client TEXT NOT NULL DEFAULT '', channel TEXT NOT NULL DEFAULT 'web'
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text TEXT NOT NULL, created_at TEXT NOT NULL, mode TEXT,
    sources TEXT NOT NULL DEFAULT '[]', scores TEXT NOT NULL DEFAULT '[]', latency_ms REAL
);
CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
CREATE INDEX messages_by_time ON messages (created_at);
CREATE TABLE feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id INTEGER NOT NULL UNIQUE REFERENCES messages (id) ON DELETE CASCADE,
    rating TEXT NOT NULL CHECK (rating IN ('up', 'down')),
    comment TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL
);
CREATE TABLE unanswered (
    id INTEGER PRIMARY KEY AUTOINCREMENT, question TEXT NOT NULL, created_at TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'open', reason TEXT NOT NULL, top_score REAL,
    conversation_id TEXT, message_id INTEGER
);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_upgrades_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "conversations.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    ts = "2026-11-01T10:00:00.000000+00:00"
    conn.execute("INSERT INTO conversations VALUES ('c1', ?, 'tag', 'web')", (ts,))
    conn.execute(
        "INSERT INTO messages (conversation_id, role, text, created_at) VALUES ('c1', 'user', 'Do you ship to Norway?', ?)",
        (ts,),
    )
    conn.execute(
        "INSERT INTO messages (conversation_id, role, text, created_at, mode, sources, scores, latency_ms) "
        "VALUES ('c1', 'assistant', 'Yes, in 5 days.', ?, 'faq', '[\"intl\"]', '[0.88]', 31.0)",
        (ts,),
    )
    conn.execute("INSERT INTO feedback (message_id, rating, comment, created_at) VALUES (2, 'up', '', ?)", (ts,))
    conn.execute(
        "INSERT INTO unanswered (question, created_at, reason, top_score, conversation_id, message_id) "
        "VALUES ('gift cards?', ?, 'handoff', 0.2, 'c1', NULL)",
        (ts,),
    )
    conn.commit()
    conn.close()

    with ConversationStore(path) as store:
        history = store.history("c1")
        assert [(m.role, m.text) for m in history] == [
            ("user", "Do you ship to Norway?"),
            ("assistant", "Yes, in 5 days."),
        ]
        answer = history[1]
        assert (answer.mode, answer.sources, answer.scores, answer.latency_ms) == ("faq", ["intl"], [0.88], 31.0)
        assert (answer.model, answer.adapter, answer.question) == (None, None, None)  # columns added by v2
        [item] = store.unanswered()
        assert (item.question, item.resolved_entry_id) == ("gift cards?", None)
        # the old rows work with the new features
        assert store.training_pairs() == [
            TrainingPair("Do you ship to Norway?", "Yes, in 5 days.", ["intl"], "thumbs_up", 2)
        ]
        store.add_correction(2, "Yes, in 3-5 business days.")
        assert store.training_pairs()[0].origin == "correction"
        assert store.resolve_unanswered([item.id], "gift-cards") == 1
        new_cid = store.create_conversation()
        assert store.add_message(new_cid, "user", "hello") == 3

    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        check.close()
    ConversationStore(path).close()  # reopening an up-to-date database is a no-op


def test_a_newer_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "conversations.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SupportBotError, match="upgrade SupportBot") as err:
        ConversationStore(path)
    assert "version" in str(err.value)
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert check.execute("SELECT name FROM sqlite_master").fetchall() == []
    finally:
        check.close()


def test_a_file_that_is_not_a_database_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "conversations.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SupportBotError) as err:
        ConversationStore(path)
    assert err.value.fix


# -- threads ----------------------------------------------------------------------------------------


def test_concurrent_writers_all_land(tmp_path: Path) -> None:
    threads_n, per_thread = 8, 50
    errors: list[BaseException] = []
    with ConversationStore(tmp_path / "c.sqlite3") as store:
        start = threading.Barrier(threads_n)
        conversations: dict[int, str] = {}

        def writer(n: int) -> None:
            try:
                cid = store.create_conversation(client=f"t{n}")
                conversations[n] = cid
                start.wait()
                for i in range(per_thread):
                    role = "user" if i % 2 == 0 else "assistant"
                    mid = store.add_message(cid, role, f"thread {n} message {i}", mode=None if i % 2 == 0 else "faq")
                    if role == "assistant":
                        store.add_feedback(mid, "up" if i % 4 == 1 else "down")
                    store.history(cid, limit=5)
            except BaseException as exc:  # collected, re-raised in the main thread below
                errors.append(exc)

        workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        for n, cid in conversations.items():
            texts = [m.text for m in store.history(cid, limit=1000)]
            assert texts == [f"thread {n} message {i}" for i in range(per_thread)]
        buffer = io.StringIO()
        assert store.export_csv(buffer) == threads_n * per_thread
        assert sum(store.stats()["feedback"].values()) == threads_n * per_thread // 2


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite3")
    cid = store.create_conversation()
    store.close()
    store.close()
    with pytest.raises(SupportBotError, match="closed"):
        store.add_message(cid, "user", "hi")


# -- personal data ----------------------------------------------------------------------------------


def _raw_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_pii_is_redacted_everywhere_it_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    secret = f"I'm {EMAIL}, phone {PHONE}, card {CARD}, IBAN {IBAN}. Order #100234 on 2026-11-23."
    masked = "I'm [email], phone [phone], card [card], IBAN [iban]. Order #100234 on 2026-11-23."
    with ConversationStore(path, redact_keep=["support@shop.example"]) as store:
        cid = store.create_conversation()
        uid = store.add_message(cid, "user", secret)
        mid = store.add_message(
            cid, "assistant", f"Thanks! We wrote to {EMAIL}; or mail support@shop.example.", mode="faq", question=secret
        )
        store.add_feedback(mid, "down", f"call me on {PHONE}")
        store.add_correction(mid, f"We will call {PHONE} within a day.")
        store.add_unanswered(secret, conversation_id=cid, message_id=mid, top_score=0.1, reason="thumbs_down")

        assert store.get_message(uid).text == masked
        answer = store.get_message(mid)
        assert answer.text == "Thanks! We wrote to [email]; or mail support@shop.example."
        assert answer.question == masked
        assert store.low_rated()[0]["comment"] == "call me on [phone]"
        assert store.training_pairs()[0].answer == "We will call [phone] within a day."
        assert store.unanswered()[0].question == masked
        buffer = io.StringIO()
        store.export_csv(buffer)
        assert EMAIL not in buffer.getvalue() and "4111" not in buffer.getvalue()
    raw = _raw_bytes(path)
    for needle in (EMAIL, "123-4567", "4111 1111", "DE89", "3704 0044"):
        assert needle.encode() not in raw, needle
    assert b"#100234" in raw  # everything else is kept


def test_pii_is_kept_when_redaction_is_off(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    text = f"{EMAIL} {PHONE} {CARD} {IBAN}"
    with ConversationStore(path, redact_pii=False) as store:
        cid = store.create_conversation()
        mid = store.add_message(cid, "assistant", text, mode="faq", question=text)
        store.add_feedback(mid, "down", text)
        msg = store.get_message(mid)
        assert msg.text == text and msg.question == text
        assert store.low_rated()[0]["comment"] == text
    assert EMAIL.encode() in _raw_bytes(path)
