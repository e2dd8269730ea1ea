"""A LangChain retriever over the knowledge base, so FAQ entries plug into LangChain chains.

retriever = FAQRetriever(kb=kb, k=3)
docs = retriever.invoke("how long does shipping take?")
docs[0].page_content   # "Q: ...\\nA: ..."
docs[0].metadata       # {"id", "question", "answer", "category", "score", ...}
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

__all__ = ["FAQRetriever"]


class FAQRetriever(BaseRetriever):
    """Returns the ``k`` best FAQ entries as Documents; ``min_score`` drops weak matches."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kb: Any
    """A `knowledge_base.kb.KnowledgeBase` (typed loosely so pydantic need not know the class)."""
    k: int = 4
    min_score: float = 0.0
    category: str | None = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        hits = self.kb.search(query, self.k, category=self.category)
        return [
            Document(
                page_content=f"Q: {h.entry.question}\nA: {h.entry.answer}",
                metadata=h.to_dict(),
                id=h.entry.id,
            )
            for h in hits
            if h.score >= self.min_score
        ]
