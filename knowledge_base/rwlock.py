"""A readers-writer lock: searches share the knowledge base's indexes, edits own them.

The knowledge base rewrites its index files in the background after an edit (up to seconds at
100,000 entries). Under a plain lock every search waited for that; a save only reads the indexes,
so it now shares them with searches, and only edits wait.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ReadWriteLock"]


class ReadWriteLock:
    """Many readers or one writer.

    * The writer may re-enter, and may read while it writes (an edit saving the indexes).
    * A waiting writer holds back new readers, so a stream of searches cannot starve an edit.
    * A reader must not ask for the write lock, nor read again while a writer might be waiting
      (that deadlocks, as with any lock of this kind): keep read sections flat.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._depth = 0
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            nested = self._writer == me
            if nested:
                self._depth += 1
            else:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                if nested:
                    self._depth -= 1
                else:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()
