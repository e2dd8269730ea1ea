"""Whether the LLM answers the band between the two thresholds (``policy.generation``).

``"on"`` / ``"off"`` say it outright. ``"auto"`` (the default) turns generation on only where it
pays off, and otherwise the policy offers "did you mean" with the relevant entries instead:

* a GPU (``model.device`` cuda, or ``auto`` with CUDA available), or an ``openai`` backend (a model
  server: vLLM, TGI...), answers in a second or two;
* an active LoRA adapter whose fine-tune report shows that it answers from its entries (RAG token
  F1 after training >= :data:`ANSWERS_FROM_ENTRIES_F1` and better than before);
* the bundled 135M base model on a CPU does neither: it takes 15-35 s and the guard rejects most
  of its drafts, which then end as the FAQ answer or a hand-off anyway (measured in docs/chat.md).

The answer is cached per adapter version, so a console activation takes effect on the next message.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from typing import Any

from chatbot.adapters import AdapterInfo, AdapterRegistry
from chatbot.settings import Settings

__all__ = ["ANSWERS_FROM_ENTRIES_F1", "GenerationSwitch", "Verdict", "adapter_answers_from_entries", "cuda_available"]

#: RAG token F1 of an adapter's answers against the entries' answers (fine-tune report, eval split)
#: from which its answers are taken to come from the entries. The base SmolLM2-135M scores ~0.2.
ANSWERS_FROM_ENTRIES_F1 = 0.5


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False when torch is not installed)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def adapter_answers_from_entries(adapter: AdapterInfo | None) -> bool:
    """Whether ``adapter``'s fine-tune report shows answers taken from the entries."""
    if adapter is None:
        return False
    metrics: dict[str, Any] = adapter.metadata.get("metrics", {}) or {}
    after = (metrics.get("after") or {}).get("rag_token_f1")
    before = (metrics.get("before") or {}).get("rag_token_f1")
    if not isinstance(after, int | float):
        return False
    return after >= ANSWERS_FROM_ENTRIES_F1 and (not isinstance(before, int | float) or after > before)


@dataclass(frozen=True)
class Verdict:
    on: bool
    reason: str


class GenerationSwitch:
    """Resolves ``policy.generation`` for one process (the engine asks it before each decision)."""

    def __init__(self, *, cuda: bool | None = None) -> None:
        self._cuda = cuda
        self._lock = threading.Lock()
        self._cached: tuple[str | None, Verdict] | None = None

    def _gpu(self, settings: Settings) -> bool:
        model = settings.model
        if model.device.startswith("cuda"):
            return True
        if model.device != "auto":
            return False
        if self._cuda is None:
            self._cuda = cuda_available()
        return self._cuda

    def verdict(self, settings: Settings) -> Verdict:
        """On or off for ``settings`` (the engine's current ones: they may change at run time)."""
        policy, model = settings.policy, settings.model
        if not policy.generate or policy.generation == "off":
            return Verdict(False, "generation is off (policy.generation)")
        if policy.generation == "on":
            return Verdict(True, "generation is on (policy.generation)")
        if model.backend == "openai":
            return Verdict(True, "auto: a model server answers")
        if self._gpu(settings):
            return Verdict(True, "auto: a GPU answers")
        active = AdapterRegistry(settings.data_dir).active()
        version = active.version if active else None
        with self._lock:
            if self._cached is not None and self._cached[0] == version:
                return self._cached[1]
            if adapter_answers_from_entries(active):
                verdict = Verdict(True, f"auto: adapter {active.name if active else ''} answers from its entries")
            else:
                verdict = Verdict(False, "auto: the base model on a CPU is too slow to answer in time")
            self._cached = (version, verdict)
            return verdict
