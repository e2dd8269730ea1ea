"""The LoRA adapters in the data directory, and which one the chat engine serves.

Layout::

    <data_dir>/adapters/
        active.json               {"name": "v2", "activated_at": "..."} (written atomically)
        <name>/                   one adapter in peft's format
            adapter_config.json
            adapter_model.safetensors
            supportbot_adapter.json   base model, dataset hash, settings, metrics, created date

``supportbot finetune`` writes the folders (``finetune.lora.save_adapter``), ``supportbot adapters``
manages them through :class:`AdapterRegistry`, and the chat engine polls :meth:`AdapterRegistry.active`:
:attr:`AdapterInfo.version` changes whenever the adapter's files change, so noticing a swap costs
a few ``stat`` calls and no model load. This module imports neither torch nor peft.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowledge_base.atomic import atomic_write_text
from knowledge_base.errors import NotFoundError, SupportBotError

__all__ = [
    "ACTIVE_FILE",
    "ADAPTERS_DIRNAME",
    "METADATA_FILE",
    "AdapterError",
    "AdapterInfo",
    "AdapterRegistry",
    "validate_adapter_name",
]

log = logging.getLogger(__name__)

ADAPTERS_DIRNAME = "adapters"
ACTIVE_FILE = "active.json"
METADATA_FILE = "supportbot_adapter.json"
#: The files peft writes; a folder without its config is not an adapter (yet).
CONFIG_FILE = "adapter_config.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(SupportBotError):
    """An adapter that cannot be managed as asked (bad name, removing the active one...)."""


def validate_adapter_name(name: str) -> str:
    """Return ``name`` if it is usable as a folder name, else raise AdapterError saying why."""
    if not _NAME.match(name or "") or name.endswith(".") or ".." in name:
        raise AdapterError(
            f"{name!r} is not a valid adapter name",
            fix="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. faq-v2)",
        )
    return name


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter folder as the registry sees it."""

    name: str
    path: Path
    metadata: dict[str, Any] = field(compare=False, hash=False)
    created_at: str
    active: bool
    version: str
    """Changes whenever any file of the adapter changes (name, sizes, modification times)."""

    def to_dict(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "name": self.name,
            "path": str(self.path),
            "active": self.active,
            "version": self.version,
            "created_at": self.created_at,
            "base_model": meta.get("base_model", ""),
            "dataset_hash": meta.get("dataset_hash", ""),
            "metrics": meta.get("metrics", {}),
        }


class AdapterRegistry:
    """The adapters under ``<data_dir>/adapters/`` and the active one."""

    def __init__(self, data_dir: Path | str) -> None:
        self.root = Path(data_dir) / ADAPTERS_DIRNAME

    # -- lookups -----------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """Where adapter ``name`` lives (whether or not it exists yet)."""
        return self.root / validate_adapter_name(name)

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file()
        )

    def _active_name(self) -> str | None:
        file = self.root / ACTIVE_FILE
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", file, exc)
            return None
        name = data.get("name") if isinstance(data, dict) else None
        return name if isinstance(name, str) and name else None

    def _info(self, name: str, active_name: str | None) -> AdapterInfo:
        folder = self.root / name
        metadata: dict[str, Any] = {}
        meta_file = folder / METADATA_FILE
        if meta_file.is_file():
            try:
                loaded = json.loads(meta_file.read_text(encoding="utf-8"))
                metadata = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable %s: %s", meta_file, exc)
        # Fingerprint of the folder's files: a retrained or replaced adapter gets a new version even
        # under the same name, without reading the weights.
        digest = hashlib.sha1(name.encode("utf-8"))
        newest = 0.0
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            stat = file.stat()
            newest = max(newest, stat.st_mtime)
            digest.update(f"\0{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        created = str(metadata.get("created_at") or _iso(newest or folder.stat().st_mtime))
        return AdapterInfo(
            name=name,
            path=folder,
            metadata=metadata,
            created_at=created,
            active=name == active_name,
            version=f"{name}@{digest.hexdigest()[:12]}",
        )

    def list(self) -> list[AdapterInfo]:
        """Every adapter, oldest first (by creation date, then name)."""
        active = self._active_name()
        infos = [self._info(name, active) for name in self._names()]
        return sorted(infos, key=lambda info: (info.created_at, info.name))

    def exists(self, name: str) -> bool:
        return (self.path(name) / CONFIG_FILE).is_file()

    def get(self, name: str) -> AdapterInfo:
        if not self.exists(name):
            known = ", ".join(self._names()) or "none yet"
            raise NotFoundError(
                f"no adapter named {name!r} in {self.root} (adapters: {known})",
                fix="see `supportbot adapters list`; train one with `supportbot finetune --output NAME`",
            )
        return self._info(name, self._active_name())

    def active(self) -> AdapterInfo | None:
        """The adapter the chat engine should serve, or None for the plain model.

        Cheap enough to call before every answer: one small JSON read and a few ``stat`` calls.
        An active adapter whose folder was deleted behind the registry's back counts as none.
        """
        name = self._active_name()
        if name is None:
            return None
        try:
            if not self.exists(name):
                log.warning("active adapter %r is missing from %s; serving the plain model", name, self.root)
                return None
        except AdapterError:
            return None
        return self._info(name, name)

    # -- changes -----------------------------------------------------------------------------------

    def _write_active(self, name: str | None) -> None:
        payload = {"name": name, "activated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(self.root / ACTIVE_FILE, json.dumps(payload, indent=2) + "\n")

    def activate(self, name: str) -> AdapterInfo:
        """Make ``name`` the served adapter (the engine picks it up at its next answer)."""
        self.get(name)
        self._write_active(name)
        return self.get(name)

    def deactivate(self) -> AdapterInfo | None:
        """Serve the plain model again; returns the adapter that was active, if any."""
        previous = self.active()
        if self._active_name() is not None:
            self._write_active(None)
        return previous

    def remove(self, name: str) -> AdapterInfo:
        """Delete adapter ``name``; refuses the active one (deactivate or activate another first)."""
        info = self.get(name)
        if info.active:
            raise AdapterError(
                f"adapter {name!r} is active: the chat engine is serving it",
                fix="run `supportbot adapters deactivate` (or activate another adapter) first",
            )
        # Rename first, so a half-deleted folder is never listed as an adapter.
        trash = self.root / f".removing-{name}-{uuid.uuid4().hex[:8]}"
        info.path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return info
