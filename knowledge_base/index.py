"""The derived search indexes: FAISS over question (and answer) vectors, and an incremental BM25.

Both are rebuilt from SQLite whenever they disagree with it, and both are written to disk as one
file each, atomically, stamped with the database revision they reflect.

Why a home-made BM25 rather than ``bm25s``: bm25s re-indexes the whole corpus on any change
(0.5 s at 10,000 entries here), while a single-entry edit must be searchable in well under 200 ms.
Postings kept per term make add/remove O(terms of that entry).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from knowledge_base.atomic import atomic_path, atomic_write_text

__all__ = ["DenseIndex", "LexicalIndex", "VectorKey", "tokenize"]

# Words that carry no meaning for matching FAQ questions (question words kept: "how long" vs "how much").
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "i",
        "me",
        "my",
        "we",
        "our",
        "you",
        "your",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "their",
        "they",
        "them",
        "he",
        "she",
        "his",
        "her",
        "so",
        "than",
        "too",
        "very",
        "can",
        "could",
        "would",
        "should",
        "will",
        "just",
        "about",
        "into",
        "over",
        "also",
        "any",
        "some",
        "please",
        "hi",
        "hello",
        "thanks",
        "thank",
    ]
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _stem(word: str) -> str:
    """A light suffix stripper (shipping/shipped/ships -> ship): enough for FAQ-sized vocabularies."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", ""), ("ly", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + repl
            break
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        word = word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    words = _WORD.findall(text.lower().replace("’", "'"))
    return [_stem(w.split("'")[0]) for w in words if w not in STOPWORDS and w.split("'")[0] not in STOPWORDS]


@dataclass(frozen=True)
class VectorKey:
    entry_id: str
    kind: str  # "q" for a question phrasing, "a" for the answer, "l" for a learned phrasing (examples)
    text_hash: str


class DenseIndex:
    """Exact inner-product search (vectors are normalized, so scores are cosines) with stable ids."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.keys: dict[int, VectorKey] = {}
        self.by_entry: dict[str, list[int]] = {}
        self._next = 0
        # Each key as saved, kept from one save to the next: a save then mostly joins strings
        # instead of running json over 200,000 keys while searches wait for the interpreter lock.
        self._key_json: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def entry_ids(self) -> set[str]:
        return set(self.by_entry)

    def add(self, keys: Sequence[VectorKey], vectors: np.ndarray) -> None:
        if not keys:
            return
        ids = np.arange(self._next, self._next + len(keys), dtype=np.int64)
        self._next += len(keys)
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        for vid, key in zip(ids.tolist(), keys, strict=True):
            self._add_key(vid, key)

    def _add_key(self, vid: int, key: VectorKey) -> None:
        self.keys[vid] = key
        self.by_entry.setdefault(key.entry_id, []).append(vid)

    def remove_entries(self, entry_ids: Iterable[str]) -> None:
        vids = [vid for e in entry_ids for vid in self.by_entry.pop(e, [])]
        if vids:
            self.index.remove_ids(np.asarray(vids, dtype=np.int64))  # type: ignore[arg-type]
            for vid in vids:
                del self.keys[vid]
                self._key_json.pop(vid, None)

    def remove_kind(self, entry_id: str, kind: str) -> None:
        """Drop one kind of vector of an entry (its learned phrasings, when its examples change)."""
        vids = [vid for vid in self.by_entry.get(entry_id, []) if self.keys[vid].kind == kind]
        if vids:
            self.index.remove_ids(np.asarray(vids, dtype=np.int64))  # type: ignore[arg-type]
            drop = set(vids)
            self.by_entry[entry_id] = [vid for vid in self.by_entry[entry_id] if vid not in drop]
            for vid in vids:
                del self.keys[vid]
                self._key_json.pop(vid, None)

    def keys_of(self, entry_id: str) -> list[VectorKey]:
        return [self.keys[vid] for vid in self.by_entry.get(entry_id, [])]

    def search(self, query: np.ndarray, n: int, *, allowed: set[str] | None = None) -> list[tuple[int, float]]:
        """The ``n`` best vectors as (vector id, cosine); ``allowed`` restricts to those entries."""
        if not self.keys:
            return []
        params = None
        if allowed is not None:
            vids = [v for e in allowed for v in self.by_entry.get(e, [])]
            if not vids:
                return []
            params = faiss.SearchParameters(
                # type: ignore[call-arg]
                sel=faiss.IDSelectorBatch(np.asarray(vids, dtype=np.int64))
            )
        n = min(n, len(self.keys))
        scores, ids = self.index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), n, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def vectors_of(self, entry_id: str) -> tuple[list[VectorKey], np.ndarray]:
        vids = self.by_entry.get(entry_id, [])
        if not vids:
            return [], np.zeros((0, self.dim), dtype=np.float32)
        return [self.keys[v] for v in vids], np.vstack([self.index.reconstruct(v) for v in vids])

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: Path, *, revision: int, model: str) -> None:
        head = json.dumps({"revision": revision, "model": model, "dim": self.dim, "next": self._next})
        cached = self._key_json
        for vid, k in self.keys.items():  # new keys only (all of them at the first save after a load)
            if vid not in cached:
                cached[vid] = json.dumps([vid, k.entry_id, k.kind, k.text_hash])
        meta = f'{head[:-1]}, "keys": [{",".join(cached[vid] for vid in self.keys)}]}}'
        # The stored vectors and ids as views of the index's own memory, written straight into the
        # temp file: a serialized copy of the index (300 MB at 100,000 entries) is never made.
        n = self.index.ntotal
        flat: Any = faiss.downcast_index(self.index.index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim) if n else np.zeros((0, self.dim))
        ids = faiss.vector_to_array(self.index.id_map)
        with atomic_path(path) as tmp, tmp.open("wb") as out:
            np.savez(
                out,
                vectors=vectors.astype(np.float32, copy=False),
                ids=ids.astype(np.int64, copy=False),
                meta=np.frombuffer(meta.encode("utf-8"), dtype=np.uint8),
            )

    @classmethod
    def load(cls, path: Path) -> tuple[DenseIndex, int, str]:
        """The index, the revision it reflects and its embedding model; raises on a damaged file."""
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            self = cls(int(meta["dim"]))
            if "index" in data:  # written by SupportBot 0.1: a serialized FAISS index
                self.index = faiss.deserialize_index(data["index"])  # type: ignore[assignment]
            elif len(data["ids"]):
                self.index.add_with_ids(np.ascontiguousarray(data["vectors"], dtype=np.float32), data["ids"])
        self._next = int(meta["next"])
        for vid, entry_id, kind, text_hash in meta["keys"]:
            self._add_key(vid, VectorKey(entry_id, kind, text_hash))
        if self.index.ntotal != len(self.keys):
            raise ValueError("index and its keys disagree")
        return self, int(meta["revision"]), str(meta["model"])


class LexicalIndex:
    """Okapi BM25 with postings per term, so entries are added and removed one at a time.

    Scoring is vectorized: each entry has a row, and a query term's posting list is turned into
    numpy arrays (rows, term frequencies) the first time a query needs it after a change to it, so
    a query costs a few array operations per term instead of a Python loop over every matching
    entry (at 100,000 entries a common word matches most of them).
    """

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.docs: dict[str, Counter[str]] = {}
        self.postings: dict[str, dict[str, int]] = {}
        self.total_length = 0
        self._rows: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self._row_lengths = np.zeros(0, np.float64)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._doc_json: dict[str, str] = {}  # each entry as saved, from one save to the next

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, entry_id: str, text: str) -> None:
        self.remove(entry_id)
        self._add_counts(entry_id, Counter(tokenize(text)))

    def _add_counts(self, entry_id: str, terms: Counter[str]) -> None:
        self.docs[entry_id] = terms
        length = sum(terms.values())
        self.total_length += length
        row = self._free.pop() if self._free else len(self._ids)
        if row == len(self._ids):
            self._ids.append(entry_id)
            if row >= len(self._row_lengths):
                self._row_lengths = np.resize(self._row_lengths, max(16, 2 * row))
        else:
            self._ids[row] = entry_id
        self._rows[entry_id] = row
        self._row_lengths[row] = length  # the entry's length in terms, by row
        for term, tf in terms.items():
            self.postings.setdefault(term, {})[entry_id] = tf
            self._arrays.pop(term, None)

    def remove(self, entry_id: str) -> None:
        terms = self.docs.pop(entry_id, None)
        if terms is None:
            return
        self._doc_json.pop(entry_id, None)
        row = self._rows.pop(entry_id)
        self.total_length -= int(self._row_lengths[row])
        self._ids[row] = None
        self._free.append(row)
        for term in terms:
            posting = self.postings[term]
            del posting[entry_id]
            if not posting:
                del self.postings[term]
            self._arrays.pop(term, None)

    def idf(self, term: str) -> float:
        n = len(self.docs)
        df = len(self.postings.get(term, ()))
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def _posting_arrays(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(term)
        if arrays is None:
            posting = self.postings[term]
            rows = np.fromiter((self._rows[e] for e in posting), np.int64, len(posting))
            tfs = np.fromiter(posting.values(), np.float64, len(posting))
            arrays = self._arrays[term] = (rows, tfs)
        return arrays

    def scores(
        self, query: str, *, allowed: set[str] | None = None, top: int | None = None, include: Iterable[str] = ()
    ) -> dict[str, float]:
        """BM25 of each matching entry, divided by the best score the query could reach.

        The ceiling is what an average-length entry containing each query term once would score,
        sum(idf) over the query's terms (a term the index has never seen counts with the idf of a
        one-off term); scores are clipped to 1, so they lie in [0, 1] and mean the same thing for
        every query: a threshold on them is meaningful.

        With ``top``, only the ``top`` best matching entries are returned, plus those of
        ``include`` that match (a ranker's other candidates): at 100,000 entries, a dict of every
        match costs more than the scoring.
        """
        terms = tokenize(query)
        if not terms or not self.docs:
            return {}
        n = len(self.docs)
        avg = self.total_length / n
        unseen_idf = math.log(1.0 + (n - 1 + 0.5) / 1.5)
        ceiling = sum(self.idf(t) if t in self.postings else unseen_idf for t in terms)
        acc = np.zeros(len(self._ids), np.float64)
        for term in terms:
            if term not in self.postings:
                continue
            rows, tfs = self._posting_arrays(term)
            norm = self.k1 * (1 - self.b + self.b * self._row_lengths[rows] / avg)
            acc[rows] += self.idf(term) * tfs * (self.k1 + 1) / (tfs + norm)
        if allowed is not None:
            keep = np.zeros(len(acc), bool)
            keep[[self._rows[e] for e in allowed if e in self._rows]] = True
            acc[~keep] = 0.0
        hit = np.flatnonzero(acc)
        if top is not None and len(hit) > top:
            best = hit[np.argpartition(-acc[hit], top - 1)[:top]]
            extra = [r for r in (self._rows.get(e) for e in include) if r is not None and acc[r] > 0]
            hit = np.union1d(best, np.asarray(extra, np.int64))
        values = np.minimum(acc[hit] / ceiling, 1.0).tolist()
        return {self._ids[r]: v for r, v in zip(hit.tolist(), values, strict=True)}  # type: ignore[misc]

    def save(self, path: Path, *, revision: int) -> None:
        head = json.dumps({"revision": revision, "k1": self.k1, "b": self.b})
        cached = self._doc_json
        for entry_id, terms in self.docs.items():  # new entries only (all at the first save after a load)
            if entry_id not in cached:
                cached[entry_id] = f"{json.dumps(entry_id)}: {json.dumps(terms)}"
        docs = ", ".join(cached[e] for e in self.docs)
        atomic_write_text(path, f'{head[:-1]}, "docs": {{{docs}}}}}')

    @classmethod
    def load(cls, path: Path) -> tuple[LexicalIndex, int]:
        payload = json.loads(path.read_text(encoding="utf-8"))
        self = cls(payload["k1"], payload["b"])
        for entry_id, terms in payload["docs"].items():
            self._add_counts(entry_id, Counter({t: int(c) for t, c in terms.items()}))
        return self, int(payload["revision"])
