"""Settings changed from the console: validated, saved atomically, applied without a restart, audited.

:func:`apply_changes` takes ``{"section.field": value}`` from a form, converts and validates the
values with the same rules as the settings loader (`chatbot.settings`: types, choices, each
section's ``problems()``), merges them into ``<data_dir>/supportbot.toml`` (temp file + rename),
swaps the engine's settings object (the next answer uses them: thresholds, generation, hand-off
text and hours, notifications), and appends who changed what to ``<data_dir>/settings-audit.jsonl``
(secrets masked). Nothing is written when any value is wrong: the ConfigError lists every problem.

Values set by ``--config``, ``SUPPORTBOT_*`` variables or ``--set`` win over the data-dir file at the
next start (the console says which keys those are: :func:`overridden_elsewhere`).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatbot.settings import (
    SECRET_FIELDS,
    SECTIONS,
    Settings,
    _convert,
    _field_types,
    write_data_dir_config,
)
from knowledge_base.errors import ConfigError, Problem

__all__ = ["AUDIT_FILE", "EDITABLE", "apply_changes", "audit_log", "current_values", "settings_fields"]

AUDIT_FILE = "settings-audit.jsonl"

#: What the console edits (the rest needs a restart or is a deployment decision: ports, keys, model).
EDITABLE = (
    "policy.handoff_message",
    "policy.faq_threshold",
    "policy.relevance_threshold",
    "policy.clarify_margin",
    "policy.generation",
    "handoff.ask_contact",
    "handoff.contact_prompt",
    "handoff.contact_retention_days",
    "handoff.hours",
    "handoff.timezone",
    "handoff.outside_hours_message",
    "handoff.webhook_url",
    "handoff.smtp_host",
    "handoff.smtp_port",
    "handoff.smtp_starttls",
    "handoff.smtp_user",
    "handoff.smtp_password",
    "handoff.smtp_from",
    "handoff.smtp_to",
)
_lock = threading.Lock()


def current_values(settings: Settings) -> dict[str, Any]:
    """The editable settings' values (secrets included: the console shows them masked)."""
    out = {}
    for key in EDITABLE:
        section, name = key.split(".", 1)
        out[key] = getattr(getattr(settings, section), name)
    return out


def _mask(key: str, value: Any) -> Any:
    return "***" if key.split(".", 1)[1] in SECRET_FIELDS and value else value


def apply_changes(engine: Any, changes: Mapping[str, Any], *, who: str) -> Settings:
    """Validate ``changes``, save and apply them; returns the new settings (ConfigError if any is wrong)."""
    with _lock:
        settings: Settings = engine.settings
        problems: list[Problem] = []
        by_section: dict[str, dict[str, Any]] = {}
        diff: dict[str, list[Any]] = {}
        for key, raw in changes.items():
            if key not in EDITABLE:
                problems.append(Problem(key, "cannot be changed from the console", "edit supportbot.toml and restart"))
                continue
            section, name = key.split(".", 1)
            value, bad = _convert(raw, _field_types(SECTIONS[section])[name], key)
            if bad:
                problems.append(bad)
                continue
            old = getattr(getattr(settings, section), name)
            if value != old:
                by_section.setdefault(section, {})[name] = value
                diff[key] = [_mask(key, old), _mask(key, value)]
        if problems:
            raise ConfigError(problems)
        if not diff:
            return settings
        updated = settings.replace(**by_section)
        for section in by_section:
            problems.extend(getattr(updated, section).problems())
        if problems:
            raise ConfigError(problems)
        write_data_dir_config(settings, by_section)
        engine.settings = updated
        if getattr(engine, "handoff", None) is not None:
            engine.handoff.settings = updated
        entry = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "who": who, "changes": diff}
        with (Path(settings.data_dir) / AUDIT_FILE).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return updated


def audit_log(settings: Settings, *, limit: int = 50) -> list[dict[str, Any]]:
    """The latest changes, newest first."""
    path = Path(settings.data_dir) / AUDIT_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:  # a line cut by a crash: skip it, keep the rest
            continue
    return entries[::-1][:limit]


def settings_fields() -> list[tuple[str, Any]]:
    """``(key, type)`` of each editable setting, for building a form."""
    return [(k, _field_types(SECTIONS[k.split(".")[0]])[k.split(".", 1)[1]]) for k in EDITABLE]
