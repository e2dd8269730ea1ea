"""The console's "Settings" tab: what a support lead changes without a config file or a restart.

Hand-off message and hours, notifications (webhook, SMTP), the thresholds and whether the LLM
answers the middle band. Saving calls `chatbot.settings_admin.apply_changes`: validated by the
settings object's own rules, written atomically to ``<data_dir>/supportbot.toml``, applied to the
next answer, and logged with the console user's name (the table below the form).
"""

from __future__ import annotations

import html
import typing
from typing import Any

import gradio as gr
import pandas as pd

from chatbot.settings import SECRET_FIELDS
from chatbot.settings_admin import apply_changes, audit_log, current_values, settings_fields
from knowledge_base.errors import ConfigError

__all__ = ["AUDIT_COLUMNS", "audit_table", "build_settings_tab"]

AUDIT_COLUMNS = ["when", "who", "setting", "before", "after"]


def audit_table(entries: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        [e.get("at", "")[:19].replace("T", " "), e.get("who", ""), key, str(old), str(new)]
        for e in entries
        for key, (old, new) in e.get("changes", {}).items()
    ]
    return pd.DataFrame(rows, columns=AUDIT_COLUMNS)


def _component(key: str, kind: Any, value: Any) -> Any:
    label = key
    if typing.get_origin(kind) is typing.Literal:
        return gr.Radio(list(typing.get_args(kind)), value=value, label=label)
    if kind is bool:
        return gr.Checkbox(value=value, label=label)
    if kind in (int, float):
        return gr.Number(value=value, label=label, precision=0 if kind is int else None)
    secret = key.split(".", 1)[1] in SECRET_FIELDS
    lines = 3 if key.endswith("message") else 1
    return gr.Textbox(value=value, label=label, type="password" if secret else "text", lines=lines)


def build_settings_tab(engine: Any) -> tuple[Any, list[Any], list[Any]]:
    """The tab's components and callbacks; returns (load function, its inputs, its outputs)."""
    gr.Markdown(
        "Changes apply to the next answer, without a restart, and are saved to the data folder's "
        "`supportbot.toml`. Values given by `--config`, environment variables or `--set` win at the "
        "next start."
    )
    fields = settings_fields()
    values = current_values(engine.settings)
    inputs = []
    for key, kind in fields:
        inputs.append(_component(key, kind, values[key]))
    save_button = gr.Button("Save settings", variant="primary")
    message = gr.Markdown()
    gr.Markdown("### Changes")
    audit = gr.Dataframe(headers=AUDIT_COLUMNS, interactive=False, wrap=True, max_height=300)

    def save_settings(data: dict[Any, Any], request: gr.Request) -> tuple[Any, ...]:
        changes = {key: data[component] for (key, _), component in zip(fields, inputs, strict=True)}
        who = getattr(request, "username", "") or "console"
        try:
            apply_changes(engine, changes, who=who)
        except ConfigError as exc:
            problems = "".join(
                f"<li><code>{html.escape(p.where)}</code>: {html.escape(p.message)} — {html.escape(p.fix)}</li>"
                for p in exc.problems
            )
            return f"⚠️ Not saved:<ul>{problems}</ul>", gr.skip()
        return "✅ Saved: the next answer uses these settings.", audit_table(audit_log(engine.settings))

    def refresh_settings() -> tuple[Any, ...]:
        now = current_values(engine.settings)
        return (*(now[key] for key, _ in fields), audit_table(audit_log(engine.settings)))

    # A set of inputs: the callback gets one {component: value} dict, whatever the number of fields.
    save_button.click(save_settings, set(inputs), [message, audit], api_name="save_settings", api_visibility="private")
    return refresh_settings, [], [*inputs, audit]
