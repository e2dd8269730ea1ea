"""Settings in the console (#15 item 4): validated, saved atomically, applied without a restart, audited."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_engine import ENTRIES, ScriptedGenerator

from chatbot.services import build_engine
from chatbot.settings import Settings, load_settings
from chatbot.settings_admin import AUDIT_FILE, apply_changes, audit_log
from knowledge_base.errors import ConfigError

OUT_OF_SCOPE = "What's the weather on Mars?"


@pytest.fixture
def engine(settings: Settings, embedder: Any) -> Any:
    engine = build_engine(settings, embedder=embedder, generator=ScriptedGenerator("unused"))
    engine.kb.upsert(ENTRIES)
    yield engine
    engine.store.close()
    engine.kb.close()


def test_a_change_applies_to_the_next_answer_and_survives_a_restart(engine: Any) -> None:
    before = engine.answer(OUT_OF_SCOPE)
    assert "Northwind" in before.text or "northwindgoods" in before.text
    apply_changes(
        engine,
        {"policy.handoff_message": "Ask us at gym@fit.example, we reply within a day.", "handoff.hours": ""},
        who="lead",
    )
    assert engine.answer(OUT_OF_SCOPE).text.startswith("Ask us at gym@fit.example")
    restarted = load_settings(env={}, overrides={"data_dir": str(engine.settings.data_dir)})
    assert restarted.policy.handoff_message.startswith("Ask us at gym@fit.example")
    (entry,) = audit_log(engine.settings)
    assert entry["who"] == "lead" and list(entry["changes"]) == ["policy.handoff_message"]


def test_bad_values_are_refused_and_nothing_is_written(engine: Any) -> None:
    with pytest.raises(ConfigError) as info:
        apply_changes(
            engine,
            {"policy.faq_threshold": 0.3, "handoff.hours": "weekdays", "server.port": 80, "policy.generation": "maybe"},
            who="lead",
        )
    text = str(info.value)
    assert "policy.generation" in text and "server.port" in text
    with pytest.raises(ConfigError, match="relevance_threshold"):
        apply_changes(engine, {"policy.faq_threshold": 0.3}, who="lead")  # below the relevance threshold
    assert not (engine.settings.data_dir / "supportbot.toml").exists()
    assert not (engine.settings.data_dir / AUDIT_FILE).exists()


def test_secrets_are_masked_in_the_audit_log(engine: Any) -> None:
    apply_changes(engine, {"handoff.smtp_password": "hunter2-secret"}, who="lead")
    raw = (engine.settings.data_dir / AUDIT_FILE).read_text()
    assert "hunter2" not in raw and json.loads(raw)["changes"]["handoff.smtp_password"] == ["", "***"]
    assert engine.handoff.settings.handoff.smtp_password == "hunter2-secret"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_console_settings_tab_saves_and_lists_the_change(engine: Any) -> None:
    from ui import console

    page = console.build_console(engine, engine.settings)
    block = next(f for f in page.fns.values() if f.api_name == "save_settings")
    values = {c: getattr(c, "value", None) for c in block.inputs}
    field = next(c for c in block.inputs if c.label == "policy.relevance_threshold")
    values[field] = 0.55

    class Login:
        username = "lead"

    message, audit = block.fn(values, Login())
    assert "Saved" in message and engine.settings.policy.relevance_threshold == 0.55
    assert list(audit["who"]) == ["lead"] and list(audit["setting"]) == ["policy.relevance_threshold"]
    values[field] = 0.99  # above the faq threshold
    message, _ = block.fn(values, Login())
    assert "Not saved" in message and engine.settings.policy.relevance_threshold == 0.55
