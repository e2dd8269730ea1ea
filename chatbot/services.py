"""Builds the application's long-lived objects from the settings, in one place.

The CLI, the web app and the benchmarks call these instead of wiring classes together themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chatbot.settings import Settings
from knowledge_base.embeddings import Embedder, make_embedder
from knowledge_base.kb import KnowledgeBase
from knowledge_base.private import private_dir

if TYPE_CHECKING:
    from chatbot.engine import ChatEngine
    from chatbot.generation import Generator
    from chatbot.store import ConversationStore

__all__ = ["DEMO_DIR", "build_engine", "demo_file", "open_conversation_store", "open_knowledge_base"]

DEMO_DIR = Path(__file__).resolve().parents[1] / "knowledge_base" / "demo"


def demo_file(name: str = "faq.csv") -> Path:
    """A file of the bundled demo (the Northwind Goods FAQ and its evaluation sets)."""
    return DEMO_DIR / name


def open_knowledge_base(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    background: bool = False,
) -> KnowledgeBase:
    """The knowledge base of ``settings.data_dir``. ``background`` (the server) lets large uploads
    return before their whole-entry vectors are embedded; commands leave a complete index."""
    private_dir(settings.data_dir)
    from knowledge_base.retrievers import RetrieverRegistry, load_version

    # The active fine-tuned retriever serves after a restart too (unless an embedder is imposed).
    version = RetrieverRegistry(settings.data_dir).active() if embedder is None else None
    reranker = None
    if version is not None:
        embedder, reranker = load_version(version, settings.kb)
    kb = KnowledgeBase(
        settings.data_dir / "kb",
        settings.kb,
        embedder or make_embedder(settings.kb),
        progress=progress,
        background=background,
    )
    if version is not None:
        kb.reranker, kb.retriever_version, kb.retriever_thresholds = reranker, version.version, version.thresholds
    return kb


def open_conversation_store(settings: Settings) -> ConversationStore:
    import re

    from chatbot.store import ConversationStore

    # The business's own contacts (in the hand-off message) are not personal data: keep them readable.
    private_dir(settings.data_dir)
    own_contacts = re.findall(r"[\w.+-]+@[\w.-]+|\+?\d[\d ().-]{5,}\d", settings.policy.handoff_message)
    return ConversationStore(
        settings.data_dir / "conversations.sqlite3", redact_pii=settings.policy.redact_pii, redact_keep=own_contacts
    )


def build_engine(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    generator: Generator | None = None,
    kb: KnowledgeBase | None = None,
    background: bool = False,
) -> ChatEngine:
    """The chat engine with its knowledge base, conversation store and (lazily loaded) generator."""
    from chatbot.engine import ChatEngine
    from chatbot.generation import make_generator

    return ChatEngine(
        settings,
        kb or open_knowledge_base(settings, embedder=embedder, background=background),
        open_conversation_store(settings),
        generator=generator,
        generator_factory=lambda: make_generator(
            settings.model, settings.data_dir, slots=settings.server.generation_concurrency
        ),
    )
