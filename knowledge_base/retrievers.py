"""Fine-tuned retriever versions in the data directory, and which one the knowledge base serves.

Layout::

    <data_dir>/retrievers/
        active.json         {"name": "v2", "history": ["v1"], "activated_at": "..."} (written atomically)
        <name>/
            model/          the fine-tuned embedder (a sentence-transformers folder)
            reranker/       a cross-encoder, present when one was trained (used only if report.json enables it)
            report.json     the held-out before/after report, the reranker decision, the training figures
            thresholds.json the policy thresholds calibrated for this version
            retriever.json  version id, base model, created date
        .runs/<name>/       checkpoints of an unfinished training run (``--resume``)

``supportbot finetune --retriever`` writes the folders (``finetune.retriever``); ``supportbot
retrievers`` and the console manage them through :class:`RetrieverRegistry`. Activation is a small
JSON write: the knowledge base of a running server notices it (``KnowledgeBase.use_retriever``
re-embeds in the background and swaps atomically), and a restart serves the active version.
``history`` is the stack `rollback` pops: the version served before, down to the bundled model.
This module imports neither torch nor sentence-transformers.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from knowledge_base.atomic import atomic_write_text
from knowledge_base.errors import ModelLoadError, NotFoundError, SupportBotError

__all__ = [
    "RETRIEVERS_DIRNAME",
    "CrossEncoderReranker",
    "RetrieverError",
    "RetrieverRegistry",
    "RetrieverVersion",
    "load_version",
    "serve_version",
    "validate_retriever_name",
]

log = logging.getLogger(__name__)

RETRIEVERS_DIRNAME = "retrievers"
ACTIVE_FILE = "active.json"
META_FILE = "retriever.json"
REPORT_FILE = "report.json"
THRESHOLDS_FILE = "thresholds.json"
MODEL_DIR = "model"
RERANKER_DIR = "reranker"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RetrieverError(SupportBotError):
    """A retriever version that cannot be managed as asked (bad name, removing the active one...)."""


def validate_retriever_name(name: str) -> str:
    if not _NAME.match(name or "") or name.endswith(".") or ".." in name:
        raise RetrieverError(
            f"{name!r} is not a valid retriever name",
            fix="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. ret-v2)",
        )
    return name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class RetrieverVersion:
    """One retriever folder as the registry sees it."""

    name: str
    path: Path
    meta: dict[str, Any] = field(compare=False, hash=False)
    report: dict[str, Any] = field(compare=False, hash=False)
    thresholds: dict[str, float] = field(compare=False, hash=False)
    active: bool = False

    @property
    def version(self) -> str:
        """Names the embedding model in the vector cache: a retrained folder of the same name gets
        a new id (written at save time), so its vectors never mix with the old one's."""
        return f"retriever:{self.name}:{self.meta.get('version_id', 'unknown')}"

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def reranker_enabled(self) -> bool:
        """The report's gate said the reranker pays (and its folder is there)."""
        return bool(self.report.get("reranker", {}).get("enabled")) and (self.path / RERANKER_DIR).is_dir()

    @property
    def reranker_path(self) -> Path | None:
        return self.path / RERANKER_DIR if self.reranker_enabled else None

    @property
    def created_at(self) -> str:
        return str(self.meta.get("created_at", ""))

    def to_dict(self) -> dict[str, Any]:
        after = self.report.get("after", {}).get("by_example", {})
        before = self.report.get("before", {}).get("by_example", {})
        return {
            "name": self.name,
            "path": str(self.path),
            "active": self.active,
            "version": self.version,
            "created_at": self.created_at,
            "base_model": self.meta.get("base_model", ""),
            "reranker": self.reranker_enabled,
            "p@1_before": before.get("p@1"),
            "p@1_after": after.get("p@1"),
            "thresholds": self.thresholds,
        }


class RetrieverRegistry:
    """The retriever versions under ``<data_dir>/retrievers/`` and the active one."""

    def __init__(self, data_dir: Path | str) -> None:
        self.root = Path(data_dir) / RETRIEVERS_DIRNAME

    def path(self, name: str) -> Path:
        return self.root / validate_retriever_name(name)

    def run_dir(self, name: str) -> Path:
        """Where an unfinished training run of ``name`` keeps its checkpoints."""
        return self.root / ".runs" / validate_retriever_name(name)

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MODEL_DIR / "modules.json").is_file()
        )

    def _state(self) -> dict[str, Any]:
        return _read_json(self.root / ACTIVE_FILE)

    def _active_name(self) -> str | None:
        name = self._state().get("name")
        return name if isinstance(name, str) and name else None

    def _info(self, name: str, active: str | None) -> RetrieverVersion:
        folder = self.root / name
        thresholds = {k: float(v) for k, v in _read_json(folder / THRESHOLDS_FILE).items() if _is_number(v)}
        return RetrieverVersion(
            name=name,
            path=folder,
            meta=_read_json(folder / META_FILE),
            report=_read_json(folder / REPORT_FILE),
            thresholds=thresholds,
            active=name == active,
        )

    def list(self) -> list[RetrieverVersion]:
        """Every version, oldest first."""
        active = self._active_name()
        return sorted((self._info(n, active) for n in self._names()), key=lambda v: (v.created_at, v.name))

    def exists(self, name: str) -> bool:
        return (self.path(name) / MODEL_DIR / "modules.json").is_file()

    def get(self, name: str) -> RetrieverVersion:
        if not self.exists(name):
            known = ", ".join(self._names()) or "none yet"
            raise NotFoundError(
                f"no retriever named {name!r} in {self.root} (retrievers: {known})",
                fix="see `supportbot retrievers list`; train one with `supportbot finetune --retriever --output NAME`",
            )
        return self._info(name, self._active_name())

    def active(self) -> RetrieverVersion | None:
        """The version the knowledge base should serve, or None for the configured embedder.

        Cheap enough to poll before a search (one small JSON read and a ``stat``); an active version
        whose folder was deleted behind the registry's back counts as none."""
        name = self._active_name()
        if name is None:
            return None
        try:
            if not self.exists(name):
                log.warning("active retriever %r is missing from %s; serving the configured model", name, self.root)
                return None
        except RetrieverError:
            return None
        return self._info(name, name)

    def _write_state(self, name: str | None, history: Sequence[str]) -> None:
        payload = {
            "name": name,
            "history": list(history)[-20:],
            "activated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(self.root / ACTIVE_FILE, json.dumps(payload, indent=2) + "\n")

    def activate(self, name: str) -> RetrieverVersion:
        """Serve ``name``; the one served before goes on the rollback history."""
        self.get(name)
        current = self._active_name()
        history = [h for h in self._state().get("history", []) if isinstance(h, str)]
        if current != name:
            history.append(current or "")
        self._write_state(name, history)
        return self.get(name)

    def rollback(self) -> RetrieverVersion | None:
        """Serve the version that was active before the current one (None: the configured embedder);
        versions removed since are skipped."""
        state = self._state()
        history = [h for h in state.get("history", []) if isinstance(h, str)]
        while history:
            previous = history.pop()
            if not previous or self.exists(previous):
                self._write_state(previous or None, history)
                return self.get(previous) if previous else None
        self._write_state(None, [])
        return None

    def remove(self, name: str) -> RetrieverVersion:
        info = self.get(name)
        if info.active:
            raise RetrieverError(
                f"retriever {name!r} is active: the knowledge base is serving it",
                fix="run `supportbot retrievers rollback` (or activate another version) first",
            )
        trash = self.root / f".removing-{name}-{uuid.uuid4().hex[:8]}"
        info.path.rename(trash)  # first, so a half-deleted folder is never listed
        shutil.rmtree(trash, ignore_errors=True)
        return info


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class CrossEncoderReranker:
    """A sentence-transformers ``CrossEncoder`` scoring (query, entry text) pairs; loaded on first use.

    ``score`` returns the sigmoid of the model's single logit, a probability-like number in [0, 1]
    (the knowledge base puts it in `SearchHit.score` for the reranked hits; the thresholds of a
    version with a reranker are calibrated on it)."""

    def __init__(self, folder: Path, *, device: str = "cpu", max_length: int = 128) -> None:
        self.folder, self.device, self.max_length = Path(folder), device, max_length
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                import transformers
                from sentence_transformers import CrossEncoder

                transformers.utils.logging.disable_progress_bar()
                device = self.device
                if device == "auto":
                    import torch

                    device = "cuda" if torch.cuda.is_available() else "cpu"
                try:
                    self._model = CrossEncoder(str(self.folder), device=device, max_length=self.max_length)
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(
                        f"cannot load the reranker in {self.folder}: {exc}",
                        fix="retrain the retriever (supportbot finetune --retriever) or roll back",
                    ) from exc
            return self._model

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float32)
        model = self._load()  # a 1-label CrossEncoder applies the sigmoid itself
        scores = model.predict([(query, t) for t in texts], batch_size=max(len(texts), 1), show_progress_bar=False)
        return np.asarray(scores, dtype=np.float32).reshape(-1)


def load_version(version: RetrieverVersion, settings: Any) -> tuple[Any, CrossEncoderReranker | None]:
    """(embedder, reranker or None) of a version, loaded lazily on first use; ``settings``: the
    `KBSettings` (device). The embedder is named by the version, so its cached vectors are its own."""
    from knowledge_base.embeddings import MeanPoolingEmbedder, SentenceTransformerEmbedder, _pooling_of

    folder = version.model_path
    pooling = _pooling_of(folder)
    embedder: Any
    if pooling:
        embedder = MeanPoolingEmbedder(folder, pooling=pooling, model=version.version, device=settings.embedding_device)
    else:
        embedder = SentenceTransformerEmbedder(str(folder), device=settings.embedding_device)
        embedder.name = f"st:{version.version}"
    path = version.reranker_path
    reranker = CrossEncoderReranker(path, device=settings.embedding_device) if path else None
    return embedder, reranker


def serve_version(
    kb: Any, version: RetrieverVersion | None, settings: Any, *, base: Any = None, wait: bool = False
) -> None:
    """Put ``version`` in service in ``kb`` (a `KnowledgeBase`): re-embedded in the background,
    swapped atomically; ``wait`` blocks until it serves. ``version`` None serves ``base`` (the
    embedder the knowledge base was opened with), or else the configured one."""
    if version is None:
        from knowledge_base.embeddings import make_embedder

        kb.use_retriever(base or make_embedder(settings), wait=wait)
        return
    embedder, reranker = load_version(version, settings)
    kb.use_retriever(embedder, reranker=reranker, version=version.version, thresholds=version.thresholds, wait=wait)
