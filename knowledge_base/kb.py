"""The knowledge base: SQLite entries plus the FAISS and BM25 indexes derived from them.

One object owns a data folder (``<data_dir>/kb/``) and keeps the three in step: every write goes
to SQLite first, then updates the indexes incrementally (only the changed entries' texts are
embedded, and only if their content hash is not in the cache), then saves each index atomically.
At open, an index whose revision or embedding model disagrees with SQLite is rebuilt.

With ``background=True`` (the server), a large upload (over ``kb.background_answers_above``
entries) returns once every question phrasing is embedded and indexed: it is searchable then. The
whole-entry vectors, the larger half of the embedding work, follow in a background thread
(`KnowledgeBase.wait_for_answers` waits for it); a process that stops first leaves them missing in
the saved index, and the next open resumes. Commands open with ``background=False``: complete
before they return.

A fine-tuned retriever version (`knowledge_base.retrievers`) is put in service with
`KnowledgeBase.use_retriever`: a new dense index is embedded with the new model in a background
thread while the old pair keeps answering, then embedder, index, reranker and thresholds are
swapped together under the write lock, so a search sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from knowledge_base.content_check import check_entry
from knowledge_base.embeddings import Embedder
from knowledge_base.entry import FAQEntry, normalize_text, text_hash
from knowledge_base.errors import IngestError, NotFoundError, Problem
from knowledge_base.examples import SOURCES, LabelledExample, learned_key, select_learned
from knowledge_base.export import export_entries
from knowledge_base.index import DenseIndex, LexicalIndex, VectorKey
from knowledge_base.loaders import load_faq_bytes, load_faq_file
from knowledge_base.private import private_dir
from knowledge_base.retriever import Reranker, Searcher, SearchHit, rank, rerank
from knowledge_base.rwlock import ReadWriteLock
from knowledge_base.settings import KBSettings
from knowledge_base.store import EntryStore, UpsertReport

__all__ = ["AddReport", "KnowledgeBase"]

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass
class AddReport:
    """What an upload did: counts as in the CLI contract, plus rows skipped on request."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    total: int = 0
    skipped: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    added_ids: list[str] = field(default_factory=list)
    updated_ids: list[str] = field(default_factory=list)
    answers_pending: int = 0
    """Entries searchable by their phrasings but still waiting for their whole-entry vector."""
    held: dict[str, str] = field(default_factory=dict)
    """Entries stored but held for review (`knowledge_base.content_check`): id -> reason."""

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "total": self.total,
        }
        if self.answers_pending:
            out["answers_pending"] = self.answers_pending
        if self.skipped:
            out["skipped"] = [p.to_dict() for p in self.skipped]
        if self.held:
            out["held"] = [{"id": i, "reason": r} for i, r in self.held.items()]
        return out


def _lexical_text(entry: FAQEntry, learned: Iterable[str] = ()) -> str:
    return "\n".join([*entry.questions, *learned, entry.answer])


class KnowledgeBase:
    DENSE_FILE = "dense.faiss.npz"
    LEXICAL_FILE = "bm25.json"
    EMBED_CHECKPOINT = 512
    """New vectors are written to the embedding cache every this many texts: a process killed during
    an upload (or a rebuild) resumes from its last checkpoint instead of re-embedding its whole chunk
    (5,000 entries: minutes on a CPU)."""
    INDEX_CHUNK = 5_000
    """Entries embedded and added to the index at a time: an upload of 100,000 entries would
    otherwise hold all its 200,000 vectors (300 MB) outside the index at once."""

    def __init__(
        self,
        directory: Path,
        settings: KBSettings,
        embedder: Embedder,
        *,
        progress: Progress | None = None,
        background: bool = True,
    ) -> None:
        """``background``: large uploads return once searchable and a fill left by a stopped
        process resumes in a thread (a server); False does both before returning (a command)."""
        self.directory = directory
        self.settings = settings
        self.embedder = embedder
        self.progress = progress
        self.background = background
        private_dir(directory)
        self.store = EntryStore(directory / "kb.sqlite3")
        self._lock = ReadWriteLock()  # searches and index saves read; edits write
        self._save_lock = threading.Lock()  # the save timer and the dirty flag, among savers
        self._entries: dict[str, FAQEntry] = {}
        self._save_timer: threading.Timer | None = None
        self._dirty = False
        self._answers_pending: set[str] = set()  # entries still without their whole-entry vector
        self._learned: dict[str, dict[str, str]] = {}  # entry id -> {text hash: learned phrasing}
        self._answers_thread: threading.Thread | None = None
        self._closing = threading.Event()
        atexit.register(self.flush)  # a pending background save is not lost when a CLI process ends
        self.dense: DenseIndex | None = None
        self.lexical = LexicalIndex()
        # The retriever version in service (None: the configured embedder), its reranker and the
        # policy thresholds calibrated for it; swapped with ``embedder`` and ``dense`` as one.
        self.reranker: Reranker | None = None
        self.retriever_version: str | None = None
        self.retriever_thresholds: dict[str, float] = {}
        self.rerank_top = 10
        self._swap_thread: threading.Thread | None = None
        self._swap_error: BaseException | None = None
        self._open_indexes()
        if self.settings.answer_weight > 0:  # a process that stopped during a background fill left some
            assert self.dense is not None
            with_answer = {key.entry_id for key in self.dense.keys.values() if key.kind == "a"}
            self._answers_pending = set(self._entries) - with_answer
            if self._answers_pending and background:
                self._start_answers()
            elif self._answers_pending:
                self._fill_answers()  # here and now

    # -- opening and rebuilding -----------------------------------------------------------------
    def _vector_texts(
        self,
        entries: Sequence[FAQEntry],
        *,
        questions: bool = True,
        answers: bool = True,
        embedder: Embedder | None = None,
    ) -> list[list[tuple[str, str]]]:
        """Per entry, the (kind, text) pairs it has vectors for: "q" for each question phrasing,
        "a" for question + answer (cut to ``kb.answer_tokens`` tokens) unless ``answer_weight`` is 0."""
        texts = [[("q", q) for q in dict.fromkeys(entry.questions)] if questions else [] for entry in entries]
        if answers and self.settings.answer_weight > 0:
            whole = [f"{entry.question}\n{entry.answer}" for entry in entries]
            if self.settings.answer_tokens:
                whole = (embedder or self.embedder).truncate(whole, self.settings.answer_tokens)
            for pairs, text in zip(texts, whole, strict=True):
                pairs.append(("a", text))
        return texts

    @property
    def _vector_recipe(self) -> str:
        """What the dense index's vectors are, saved with it: a different model or answer text
        (after a settings change) makes the index out of date, and it is rebuilt from the cache."""
        answers = f"{self.settings.answer_tokens or 'all'} tokens" if self.settings.answer_weight > 0 else "none"
        return f"{self.embedder.name}; answers: {answers}"

    def _open_indexes(self) -> None:
        revision = self.store.revision
        self._entries = {e.id: e for e in self.store.all(enabled_only=True)}
        dense_path, lexical_path = self.directory / self.DENSE_FILE, self.directory / self.LEXICAL_FILE
        reason = ""
        try:
            dense, dense_rev, model = DenseIndex.load(dense_path)
            if dense_rev != revision or model != self._vector_recipe or dense.entry_ids() != set(self._entries):
                reason = "dense index is out of date"
            else:
                self.dense = dense
                self._learned = self._learned_texts(dense)
        except FileNotFoundError:
            reason = "no dense index yet"
        except Exception as exc:  # a damaged file is rebuilt, never trusted
            reason = f"dense index unreadable ({exc})"
        try:
            lexical, lexical_rev = LexicalIndex.load(lexical_path)
            if lexical_rev != revision or set(lexical.docs) != set(self._entries):
                reason = reason or "BM25 index is out of date"
                raise ValueError
            self.lexical = lexical
        except Exception:
            self.lexical = LexicalIndex()
            reason = reason or "BM25 index missing or unreadable"
            self.dense = None
        if self.dense is None:
            if self._entries:
                log.warning("rebuilding the search indexes: %s", reason)
            self.reindex()

    def reindex(self) -> dict[str, int]:
        """Rebuild both indexes from SQLite (cached vectors are reused; only new texts are embedded)."""
        with self._lock.writing():
            self._entries = {e.id: e for e in self.store.all(enabled_only=True)}
            self.dense = DenseIndex(self.embedder.dim)
            self.lexical = LexicalIndex()
            self._answers_pending.clear()
            self._learned.clear()
            embedded = self._index_entries(list(self._entries.values()))
            self._save()
            self.store.prune_cache(self.embedder.name, self._live_hashes())
            return {"entries": len(self._entries), "vectors": len(self.dense), "embedded": embedded}

    def _live_hashes(self) -> set[str]:
        learned = {h for texts in self._learned.values() for h in texts}
        return learned | {text_hash(t) for pairs in self._vector_texts(self.store.all()) for _, t in pairs}

    def _embed(
        self,
        hashes: Sequence[str],
        texts: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
        *,
        embedder: Embedder | None = None,
    ) -> tuple[np.ndarray, int]:
        """(vectors for ``texts``, how many were embedded): from the cache where possible, new ones
        embedded and cached. ``hashes`` are the texts' `text_hash` values; ``embedder`` defaults to
        the one in service."""
        embedder = embedder or self.embedder
        cached = self.store.cached_vectors(embedder.name, hashes)
        missing = list(dict.fromkeys(h for h in hashes if h not in cached))
        if missing:
            by_hash = dict(zip(hashes, texts, strict=True))
            # Shortest first across checkpoints, so batches still pad to similar lengths.
            missing.sort(key=lambda h: len(by_hash[h]))
            for start in range(0, len(missing), self.EMBED_CHECKPOINT):
                part = missing[start : start + self.EMBED_CHECKPOINT]

                def step(d: int, t: int, start: int = start) -> None:
                    if progress:
                        progress(start + d, len(missing))

                vectors = embedder.embed(
                    [by_hash[h] for h in part], batch_size=self.settings.embedding_batch_size, progress=step
                )
                fresh = dict(zip(part, vectors, strict=True))
                self.store.cache_vectors(embedder.name, fresh)  # a checkpoint: kept if the process dies
                cached.update(fresh)
        if not hashes:
            return np.zeros((0, embedder.dim), np.float32), 0
        return np.vstack([cached[h] for h in hashes]), len(missing)

    def _index_entries(self, entries: Sequence[FAQEntry], *, answers: bool = True) -> int:
        """Embed (what the cache lacks) and index ``entries``, ``INDEX_CHUNK`` at a time; returns the
        number of texts embedded. ``answers=False`` leaves the whole-entry vectors out."""
        assert self.dense is not None
        texts_of = self._vector_texts(entries, answers=answers)
        total, done, embedded = sum(map(len, texts_of)), 0, 0
        report = self.progress
        for start in range(0, len(entries), self.INDEX_CHUNK):
            keys, texts = [], []
            chunk = slice(start, start + self.INDEX_CHUNK)
            for entry, pairs in zip(entries[chunk], texts_of[chunk], strict=True):
                for kind, text in pairs:
                    keys.append(VectorKey(entry.id, kind, text_hash(text)))
                    texts.append(text)

            def progress(d: int, t: int, done: int = done, n: int = len(texts)) -> None:
                if report:  # the bar counts every text of the upload; cached ones go by at once
                    report("embedding", done + round(d * n / max(t, 1)), total)

            vectors, n_embedded = self._embed([k.text_hash for k in keys], texts, progress)
            self.dense.add(keys, vectors)
            del vectors
            embedded += n_embedded
            done += len(texts)
        embedded += self._index_learned(entries, lexical=False)
        for entry in entries:
            self.lexical.add(entry.id, self._lexical_of(entry))
        return embedded

    # -- learned phrasings -----------------------------------------------------------------------
    def _lexical_of(self, entry: FAQEntry) -> str:
        learned = self._learned.get(entry.id, {}).values() if self.settings.learned_in_bm25 else ()
        return _lexical_text(entry, learned)

    def _learned_texts(self, dense: DenseIndex) -> dict[str, dict[str, str]]:
        """The wording of each learned vector of a loaded index (the index keeps hashes only)."""
        with_learned = {key.entry_id for key in dense.keys.values() if key.kind == "l"}
        out: dict[str, dict[str, str]] = {}
        for entry_id, queries in self.store.positive_queries(sorted(with_learned)).items():
            hashes = {key.text_hash for key in dense.keys_of(entry_id) if key.kind == "l"}
            out[entry_id] = {text_hash(q): q for q in queries if text_hash(q) in hashes}
        return out

    def _index_learned(self, entries: Sequence[FAQEntry], *, lexical: bool = True) -> int:
        """Rebuild the learned phrasings (vectors of kind "l") of these entries from their positive
        examples (`knowledge_base.examples.select_learned`: newest first, near-duplicates merged,
        ``kb.learned_per_entry`` at most). Returns the number of texts embedded. Called with the
        write lock held (or before the index is shared)."""
        assert self.dense is not None
        by_id = {e.id: e for e in entries}
        live = list(by_id)
        queries = self.store.positive_queries(live) if self.settings.learned_per_entry else {}
        plans: list[tuple[str, list[str]]] = []
        for entry_id in live:
            self.dense.remove_kind(entry_id, "l")
            self._learned.pop(entry_id, None)
            if entry_id not in queries:
                continue
            seen = {learned_key(q) for q in by_id[entry_id].questions}
            candidates = []
            for query in queries.get(entry_id, []):
                key = learned_key(query)
                if key and key not in seen:
                    seen.add(key)
                    candidates.append(query)
            if candidates:
                plans.append((entry_id, candidates))
        texts = [q for _, candidates in plans for q in candidates]
        report = self.progress

        def progress(done: int, total: int) -> None:
            if report:
                report("embedding learned phrasings", done, total)

        vectors, embedded = self._embed([text_hash(q) for q in texts], texts, progress if len(texts) > 50 else None)
        start = 0
        for entry_id, candidates in plans:
            mine = vectors[start : start + len(candidates)]
            start += len(candidates)
            keys, stored = self.dense.vectors_of(entry_id)
            authored = stored[[i for i, key in enumerate(keys) if key.kind == "q"]]
            kept = select_learned(candidates, mine, authored, cap=self.settings.learned_per_entry)
            hashes = [text_hash(candidates[i]) for i in kept]
            self.dense.add([VectorKey(entry_id, "l", h) for h in hashes], mine[kept])
            self._learned[entry_id] = {h: candidates[i] for h, i in zip(hashes, kept, strict=True)}
        if lexical and self.settings.learned_in_bm25:
            for entry in by_id.values():
                self.lexical.add(entry.id, self._lexical_of(entry))
        return embedded

    def learned_questions(self, entry_id: str) -> list[str]:
        """The learned phrasings of an entry as searched now, newest first (apart from its own)."""
        with self._lock.reading():
            return list(self._learned.get(entry_id, {}).values())

    def _save(self) -> None:
        assert self.dense is not None
        revision = self.store.revision
        self.dense.save(self.directory / self.DENSE_FILE, revision=revision, model=self._vector_recipe)
        self.lexical.save(self.directory / self.LEXICAL_FILE, revision=revision)

    def _save_soon(self, delay: float = 0.5) -> None:
        """Save the indexes in the background, coalescing a burst of single-entry edits.

        An edit is searchable as soon as the in-memory indexes change; rewriting the index files
        (tens of MB at 10,000 entries) would otherwise dominate an edit's latency. A crash before
        the save leaves files stamped with an older revision, which the next open rebuilds from the
        cached vectors (no re-embedding).
        """
        with self._save_lock:
            if self._save_timer is not None:
                self._save_timer.cancel()
            self._save_timer = threading.Timer(delay, self.flush)
            self._save_timer.daemon = True
            self._save_timer.start()

    def flush(self) -> None:
        """Write any pending index changes to disk now (searches go on meanwhile; edits wait)."""
        with self._lock.reading(), self._save_lock:
            if self._save_timer is not None:
                self._save_timer.cancel()
                self._save_timer = None
            if self.dense is not None and (self._dirty or not (self.directory / self.DENSE_FILE).exists()):
                self._save()
            self._dirty = False

    def _refresh(
        self,
        changed_ids: Iterable[str],
        removed_ids: Iterable[str] = (),
        *,
        save_now: bool = True,
        answers_later: bool = False,
    ) -> None:
        """Bring the indexes in step with SQLite for these entries only; with ``answers_later``
        their whole-entry vectors are left to the background fill (`_fill_answers`)."""
        assert self.dense is not None
        changed = self.store.get_many(list(dict.fromkeys(changed_ids)))
        gone = set(removed_ids) | {e.id for e in changed}
        self.dense.remove_entries(gone)
        self._answers_pending -= gone
        for entry_id in gone:
            self.lexical.remove(entry_id)
            self._entries.pop(entry_id, None)
            self._learned.pop(entry_id, None)
        held = self.store.held() if changed else {}
        live = [e for e in changed if e.enabled and e.id not in held]
        later = answers_later and self.settings.answer_weight > 0
        self._index_entries(live, answers=not later)
        self._entries.update({e.id: e for e in live})
        self._dirty = True
        if later and live:
            self._answers_pending.update(e.id for e in live)
            self._start_answers()
        if save_now:
            self.flush()
        else:
            self._save_soon()

    # -- whole-entry vectors in the background ----------------------------------------------------
    ANSWER_CHUNK = 256
    """Whole-entry texts embedded per round of the background fill: a round holds the lock only
    to add its vectors, so searches and edits go on in between."""

    def _start_answers(self) -> None:
        """Start the background fill unless it runs (called with the write lock held, or at open)."""
        if self._answers_thread is None and not self._closing.is_set():
            self._answers_thread = threading.Thread(target=self._fill_answers, name="kb-answers", daemon=True)
            self._answers_thread.start()

    def _fill_answers(self) -> None:
        """Embed the whole-entry vectors that large uploads left for later, a chunk at a time.

        Each round picks pending entries under the read lock, embeds outside any lock, and adds
        the vectors under the write lock only for entries that are still the same objects (an
        entry edited or removed meanwhile was re-indexed or dropped by that edit)."""
        done = 0
        while not self._closing.is_set():
            with self._lock.reading():
                ids = list(itertools.islice(self._answers_pending, self.ANSWER_CHUNK))
                if not ids:
                    self._answers_thread = None  # under the lock, so that a new upload starts another
                    break
                entries = [self._entries[i] for i in ids if i in self._entries]
                total = done + len(self._answers_pending)
                embedder = self.embedder
            texts = [pairs[0][1] for pairs in self._vector_texts(entries, questions=False, embedder=embedder)]
            hashes = [text_hash(t) for t in texts]
            vectors, _ = self._embed(hashes, texts, embedder=embedder)
            with self._lock.writing():
                assert self.dense is not None
                if self.embedder is not embedder:  # a retriever swap came in between: its index has them
                    continue
                keep = [
                    i for i, e in enumerate(entries) if self._entries.get(e.id) is e and e.id in self._answers_pending
                ]
                self.dense.add([VectorKey(entries[i].id, "a", hashes[i]) for i in keep], vectors[keep])
                self._answers_pending -= {entries[i].id for i in keep}
                self._answers_pending -= {i for i in ids if i not in self._entries}  # removed meanwhile
                self._dirty = True
            done += len(keep)
            if self.progress:
                self.progress("embedding answers", done, total)
        if not self._closing.is_set():
            self.flush()

    def wait_for_answers(self) -> None:
        """Block until the background fill has embedded every pending whole-entry vector (the
        benchmark times it; commands need not wait, they open with ``background=False``)."""
        while (thread := self._answers_thread) is not None and thread.is_alive():
            thread.join()

    # -- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.store.count()

    @property
    def revision(self) -> int:
        return self.store.revision

    def entries(self, *, enabled_only: bool = False, category: str | None = None) -> list[FAQEntry]:
        return self.store.all(enabled_only=enabled_only, category=category)

    def get(self, entry_id: str) -> FAQEntry:
        return self.store.get(entry_id)

    def search(
        self, query: str, k: int | None = None, *, category: str | None = None, mode: str | None = None
    ) -> list[SearchHit]:
        """The best entries for ``query``; see `knowledge_base.retriever` for what the score means."""
        query = normalize_text(query)
        if not query:
            return []
        k = k or self.settings.top_k
        while True:
            # The query is embedded outside the lock (searches must not hold edits back for it);
            # if a retriever swap landed meanwhile, the vector belongs to the old model: embed again.
            embedder = self.embedder
            vector = embedder.embed_batch([query])[0] if mode != "bm25" else np.zeros(embedder.dim, np.float32)
            with self._lock.reading():
                if self.embedder is not embedder:
                    continue
                assert self.dense is not None
                reranker = self.reranker if mode is None else None  # explicit modes show the raw signals
                allowed = {i for i, e in self._entries.items() if e.category == category} if category else None
                hits = rank(
                    query,
                    vector,
                    dense=self.dense,
                    lexical=self.lexical,
                    entries=self._entries,
                    settings=self.settings,
                    k=max(k, self.rerank_top) if reranker is not None else k,
                    allowed=allowed,
                    mode=mode,
                    learned=self._learned,
                )
            # The reranker was taken under the same lock as the index: old pair or new pair.
            return rerank(query, hits, reranker, k) if reranker is not None else hits

    def stats(self) -> dict[str, object]:
        size = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
        return {
            "entries": self.store.count(),
            "enabled": len(self._entries),
            "phrasings": sum(len(e.questions) for e in self._entries.values()),
            "learned_phrasings": sum(len(texts) for texts in self._learned.values()),
            "examples": self.store.example_counts(),
            "vectors": len(self.dense) if self.dense else 0,
            "answers_pending": len(self._answers_pending),
            "held": len(self.store.held()),
            "categories": self.store.categories(),
            "revision": self.store.revision,
            "embedding_model": self.embedder.name,
            "retriever": self.retriever_version,
            "reranker": self.reranker is not None,
            "retriever_swapping": self.swapping,
            "disk_bytes": size,
        }

    # -- retriever versions -------------------------------------------------------------------------
    def _build_dense(
        self,
        entries: Sequence[FAQEntry],
        embedder: Embedder,
        *,
        extra: Sequence[tuple[str, str]] = (),
        progress: Callable[[int, int], None] | None = None,
        learned: bool = True,
    ) -> DenseIndex:
        """A new dense index of ``entries`` (every vector kind they have, learned phrasings too
        unless ``learned`` is False) embedded with ``embedder``; ``extra``: more (entry id,
        phrasing) vectors of kind "q". Cached vectors are reused and new ones cached under the
        embedder's name, so a later swap to it embeds nothing."""
        keys, texts = [], []
        for entry, pairs in zip(entries, self._vector_texts(entries, embedder=embedder), strict=True):
            for kind, text in pairs:
                keys.append(VectorKey(entry.id, kind, text_hash(text)))
                texts.append(text)
            for text in self._learned.get(entry.id, {}).values() if learned else ():
                keys.append(VectorKey(entry.id, "l", text_hash(text)))
                texts.append(text)
        for entry_id, text in extra:
            keys.append(VectorKey(entry_id, "q", text_hash(text)))
            texts.append(text)
        dense = DenseIndex(embedder.dim)
        vectors, _ = self._embed([k.text_hash for k in keys], texts, progress, embedder=embedder)
        dense.add(keys, vectors)
        return dense

    def searcher(
        self,
        embedder: Embedder | None = None,
        *,
        reranker: Reranker | None = None,
        extra_phrasings: Sequence[tuple[str, str]] = (),
        exclude_kinds: Sequence[str] = (),
        progress: Callable[[int, int], None] | None = None,
    ) -> Searcher:
        """A ranking of the current entries with ``embedder`` (default: the one in service) over
        indexes of its own, for evaluating a candidate retriever without serving it.

        ``extra_phrasings``: (entry id, text) added as phrasings (a training split's labelled
        questions); ``exclude_kinds``: vector kinds left out (e.g. learned phrasings, "l", so that
        held-out traffic is not in the index verbatim)."""
        embedder = embedder or self.embedder
        with self._lock.reading():
            entries = dict(self._entries)
        dense = self._build_dense(
            list(entries.values()), embedder, extra=extra_phrasings, progress=progress, learned="l" not in exclude_kinds
        )
        if exclude_kinds:
            drop = [vid for vid, key in dense.keys.items() if key.kind in exclude_kinds]
            if drop:
                dense.index.remove_ids(np.asarray(drop, dtype=np.int64))  # type: ignore[arg-type]
                for vid in drop:
                    key = dense.keys.pop(vid)
                    dense.by_entry[key.entry_id].remove(vid)
        lexical = LexicalIndex()
        for entry in entries.values():
            lexical.add(entry.id, _lexical_text(entry))
        return Searcher(embedder, dense, lexical, entries, self.settings, reranker=reranker, rerank_top=self.rerank_top)

    @property
    def swapping(self) -> bool:
        """A retriever swap is re-embedding in the background."""
        thread = self._swap_thread
        return thread is not None and thread.is_alive()

    def use_retriever(
        self,
        embedder: Embedder,
        *,
        reranker: Reranker | None = None,
        version: str | None = None,
        thresholds: dict[str, float] | None = None,
        wait: bool = False,
        ready: threading.Event | None = None,
    ) -> threading.Thread:
        """Serve ``embedder`` (a retriever version; ``version`` None: the configured model).

        The entries are re-embedded in a background thread while the current embedder and index
        keep answering; then the new embedder, index, reranker and thresholds replace the old ones
        in one step under the write lock. Entries edited during the re-embedding are re-embedded
        under that lock (only they). ``ready`` (tests) is waited for before the swap. A swap
        already running is waited for first. ``wait`` blocks until the swap is done.
        """
        previous = self._swap_thread
        if previous is not None and previous.is_alive():
            previous.join()
        self._swap_error = None

        def work() -> None:
            try:
                self._swap(embedder, reranker, version, thresholds or {}, ready)
            except BaseException as exc:  # the old retriever keeps serving; the error is kept for callers
                log.exception("retriever swap to %s failed; the previous retriever keeps serving", version)
                self._swap_error = exc

        thread = threading.Thread(target=work, name="kb-retriever-swap", daemon=True)
        self._swap_thread = thread
        thread.start()
        if wait:
            self.wait_for_swap()
        return thread

    def wait_for_swap(self) -> None:
        """Block until a running retriever swap is done; re-raises its error."""
        thread = self._swap_thread
        if thread is not None:
            thread.join()
        if self._swap_error is not None:
            error, self._swap_error = self._swap_error, None
            raise error

    def _swap(
        self,
        embedder: Embedder,
        reranker: Reranker | None,
        version: str | None,
        thresholds: dict[str, float],
        ready: threading.Event | None,
    ) -> None:
        with self._lock.reading():
            snapshot = dict(self._entries)
            learned = {i: dict(texts) for i, texts in self._learned.items()}
        report = self.progress

        def progress(done: int, total: int) -> None:
            if report:
                report("re-embedding for the new retriever", done, total)

        dense = self._build_dense(list(snapshot.values()), embedder, progress=progress)
        if ready is not None:
            ready.wait()
        with self._lock.writing():
            # Edits that landed while we embedded: drop the entries changed or removed, add them anew.
            # (An entry's learned phrasings may have changed too: `learn` and `forget` leave the entry.)
            relearned = {i for i in set(learned) | set(self._learned) if learned.get(i) != self._learned.get(i)}
            stale = {i for i, e in snapshot.items() if self._entries.get(i) is not e} | relearned
            fresh = [e for i, e in self._entries.items() if snapshot.get(i) is not e or i in relearned]
            dense.remove_entries(stale)
            if fresh:
                added = self._build_dense(fresh, embedder)
                for entry in fresh:
                    keys, vectors = added.vectors_of(entry.id)
                    dense.add(keys, vectors)
            self.embedder, self.dense, self.reranker = embedder, dense, reranker
            self.retriever_version, self.retriever_thresholds = version, dict(thresholds)
            self._answers_pending.clear()  # the new index has every whole-entry vector
            self._save()  # stamped with the new recipe: a restart with this version opens it as is
            self._dirty = False

    # -- writing --------------------------------------------------------------------------------
    def upsert(self, entries: Sequence[FAQEntry], *, source: str | None = None) -> UpsertReport:
        """Insert or update entries; one or two entries save the index files in the background."""
        holds: dict[str, str] = {}
        if self.settings.hold_suspicious:
            approved = self.store.approved_hashes()
            for entry in entries:
                reason = check_entry(entry)
                if reason and approved.get(entry.id) != entry.content_hash:
                    holds[entry.id] = reason
        with self._lock.writing():
            report = self.store.upsert(entries, source=source, holds=holds)
            changed = report.added + report.updated
            if changed:
                later = self.background and 0 < self.settings.background_answers_above < len(changed)
                self._refresh(changed, save_now=len(entries) > 2, answers_later=later)
            return report

    def _finish(self, report: AddReport, upserted: UpsertReport) -> AddReport:
        report.added += len(upserted.added)
        report.updated += len(upserted.updated)
        report.unchanged += len(upserted.unchanged)
        report.added_ids += upserted.added
        report.updated_ids += upserted.updated
        report.held.update(upserted.held)
        report.total = self.store.count()
        report.answers_pending = len(self._answers_pending)
        return report

    def add_files(self, paths: Sequence[Path], *, skip_bad_rows: bool = False) -> AddReport:
        """Validate every file first; store nothing unless all of them are acceptable."""
        report = AddReport(files=[str(p) for p in paths])
        problems: list[Problem] = []
        loaded: list[FAQEntry] = []
        seen: dict[str, str] = {}
        for path in paths:
            try:
                result = load_faq_file(Path(path), self.settings, skip_bad_rows=skip_bad_rows)
            except IngestError as exc:
                problems += exc.problems
                continue
            report.skipped += result.skipped
            for entry in result.entries:
                if entry.id in seen and seen[entry.id] != str(path):
                    problems.append(
                        Problem(
                            f"{Path(path).name}",
                            f"entry id {entry.id!r} also appears in {Path(seen[entry.id]).name}",
                            "give each entry one id across the files of an upload",
                        )
                    )
                seen[entry.id] = str(path)
            loaded += result.entries
        if problems:
            raise IngestError(problems)
        return self._finish(report, self.upsert(loaded))

    def add_bytes(self, data: bytes, filename: str, *, skip_bad_rows: bool = False) -> AddReport:
        """An uploaded file (web console, API): validated as a whole, stored all-or-nothing."""
        result = load_faq_bytes(data, filename, self.settings, skip_bad_rows=skip_bad_rows)
        report = AddReport(files=[filename], skipped=list(result.skipped))
        return self._finish(report, self.upsert(result.entries))

    def delete(self, entry_ids: Sequence[str]) -> list[str]:
        with self._lock.writing():
            removed = self.store.delete(entry_ids)
            if removed:
                self._refresh([], removed, save_now=len(removed) > 2)
            return removed

    def update(self, entry_id: str, **changes: object) -> FAQEntry:
        """Edit one entry (question, answer, alt_questions, category, tags, enabled) and re-index it alone."""
        allowed = {"question", "answer", "alt_questions", "category", "tags", "enabled"}
        unknown = set(changes) - allowed
        if unknown:
            raise NotFoundError(f"cannot edit {sorted(unknown)}", fix=f"editable fields: {sorted(allowed)}")
        with self._lock.writing():
            entry = self.store.get(entry_id)
            clean: dict[str, object] = {}
            for key, value in changes.items():
                if key in ("question", "answer") and isinstance(value, str):
                    value = normalize_text(value)
                    limit = self.settings.max_question_chars if key == "question" else self.settings.max_answer_chars
                    if not value or len(value) > limit:
                        raise IngestError(
                            [
                                Problem(
                                    f"entry {entry_id}",
                                    f"{key} is empty or over {limit} characters",
                                    f"give a {key} of 1-{limit} characters",
                                )
                            ]
                        )
                if key in ("alt_questions", "tags") and value is not None:
                    value = tuple(normalize_text(str(v)) for v in value if str(v).strip())  # type: ignore[attr-defined]
                clean[key] = value
            updated = entry.with_changes(**clean)
            self.upsert([updated], source=entry.source)
            return self.store.get(entry_id)

    def add_phrasing(self, entry_id: str, question: str) -> FAQEntry:
        """Make a customer's wording another searchable phrasing of an entry (fixes a retrieval miss)."""
        entry = self.store.get(entry_id)
        question = normalize_text(question)
        if question.casefold() in {q.casefold() for q in entry.questions}:
            return entry
        return self.update(entry_id, alt_questions=(*entry.alt_questions, question))

    def held(self) -> dict[str, str]:
        """Entries held for review and never served until approved: id -> reason."""
        return self.store.held()

    def approve(self, entry_ids: Sequence[str]) -> list[str]:
        """Serve held entries from now on (an operator read them); returns the ids that were held."""
        with self._lock.writing():
            approved = self.store.approve(entry_ids)
            if approved:
                self._refresh(approved, save_now=True)
            return approved

    # -- labelled examples ------------------------------------------------------------------------
    def learn(
        self,
        query: str,
        entry_id: str,
        *,
        source: str,
        positive: bool = True,
        conversation_id: str | None = None,
        message_id: int | None = None,
    ) -> LabelledExample:
        """Store one labelled example (``query`` as redacted by the caller); a positive one is a
        learned phrasing of the entry at once (searchable when this returns)."""
        query = self._check_example(query, entry_id, source, where="the example")
        return self._learn([(query, entry_id, source, positive, time.time(), conversation_id, message_id)])[0]

    def learn_many(self, rows: Sequence[tuple[str, str]], *, source: str = "import") -> list[LabelledExample]:
        """Store ``(query, entry_id)`` positive examples all or nothing (one transaction, one
        re-index of the entries they touch); every bad row is reported at once."""
        problems, clean = [], []
        now = time.time()
        for number, (query, entry_id) in enumerate(rows, 1):
            try:
                text = self._check_example(query, entry_id, source, where=f"row {number}")
            except (IngestError, NotFoundError) as exc:
                problems += (
                    exc.problems if isinstance(exc, IngestError) else [Problem(f"row {number}", exc.message, exc.fix)]
                )
                continue
            clean.append((text, entry_id, source, True, now, None, None))
        if problems:
            raise IngestError(problems, title="the examples were rejected, nothing was learned")
        return self._learn(clean)

    def _check_example(self, query: str, entry_id: str, source: str, *, where: str) -> str:
        if source not in SOURCES:
            raise IngestError([Problem(where, f"unknown source {source!r}", f"use one of {', '.join(SOURCES)}")])
        text = normalize_text(query or "")
        if not text or len(text) > self.settings.max_question_chars:
            raise IngestError(
                [
                    Problem(
                        where,
                        f"the query is empty or over {self.settings.max_question_chars} characters",
                        "give the customer's question itself",
                    )
                ]
            )
        self.store.get(entry_id)  # NotFoundError with the fix
        return text

    def _learn(
        self, rows: Sequence[tuple[str, str, str, bool, float, str | None, int | None]]
    ) -> list[LabelledExample]:
        with self._lock.writing():
            stored = self.store.add_examples(rows)
            self._relearn({e.entry_id for e in stored if e.positive}, len(stored))
            return stored

    def _relearn(self, entry_ids: set[str], changed: int) -> None:
        """After examples changed: those entries' learned phrasings again, and the index saved
        (soon for a single example, now for a batch) so that its revision matches the database."""
        live = [self._entries[i] for i in sorted(entry_ids) if i in self._entries]  # disabled: no vectors
        if live:
            self._index_learned(live)
        self._dirty = True
        if changed > 2:
            self.flush()
        else:
            self._save_soon()

    def examples(
        self,
        *,
        entry_id: str | None = None,
        source: str | None = None,
        text: str | None = None,
        positive: bool | None = None,
        limit: int | None = None,
        conversation_id: str | None = None,
        message_id: int | None = None,
    ) -> list[LabelledExample]:
        """Stored examples matching every filter given, newest first."""
        return self.store.examples(
            entry_id=entry_id,
            source=source,
            text=text,
            positive=positive,
            limit=limit,
            conversation_id=conversation_id,
            message_id=message_id,
        )

    def forget(self, example_ids: Sequence[int]) -> int:
        """Delete examples and the learned phrasings they made; returns how many existed."""
        with self._lock.writing():
            removed = self.store.delete_examples(list(example_ids))
            if removed:
                self._relearn({e.entry_id for e in removed if e.positive}, len(removed))
            return len(removed)

    def export(self, path: Path) -> int:
        entries = self.store.all()
        export_entries(entries, path)
        return len(entries)

    def record_hits(self, entry_ids: Sequence[str]) -> None:
        self.store.record_hits(entry_ids)

    def close(self) -> None:
        self._closing.set()  # the background fill stops after its current round; the rest resumes at the next open
        if (thread := self._answers_thread) is not None:
            thread.join()
        self.flush()
        atexit.unregister(self.flush)
        self.store.close()
