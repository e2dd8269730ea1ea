"""The knowledge base's readers-writer lock, and what it buys: searches do not wait for index saves."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from knowledge_base.entry import FAQEntry
from knowledge_base.index import DenseIndex
from knowledge_base.kb import KnowledgeBase
from knowledge_base.rwlock import ReadWriteLock
from knowledge_base.settings import KBSettings

WAIT = 10.0  # seconds: only reached when something is stuck


def _in_thread(fn) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def _hold(enter, held: list) -> None:
    """Enter a lock context and keep it entered (the context object lives in ``held``)."""
    context = enter()
    context.__enter__()
    held.append(context)


def test_readers_share_the_lock():
    lock = ReadWriteLock()
    with lock.reading():
        _, done = _in_thread(lambda: _hold(lock.reading, []))
        assert done.wait(WAIT)


def test_a_writer_waits_for_readers_and_readers_wait_for_a_writer():
    lock = ReadWriteLock()
    entered, release = threading.Event(), threading.Event()

    def read_until_released() -> None:
        with lock.reading():
            entered.set()
            release.wait(WAIT)

    _in_thread(read_until_released)
    assert entered.wait(WAIT)
    held: list = []
    _, wrote = _in_thread(lambda: _hold(lock.writing, held))
    assert not wrote.wait(0.2)
    # A writer is waiting: a new reader queues behind it rather than starving it.
    _, late_read = _in_thread(lambda: _hold(lock.reading, held))
    assert not late_read.wait(0.2)
    release.set()
    assert wrote.wait(WAIT)
    assert not late_read.wait(0.2)  # the writer still holds it


def test_the_writer_may_reenter_and_read():
    lock = ReadWriteLock()
    with lock.writing(), lock.writing(), lock.reading():
        pass
    with lock.reading():  # everything was released
        pass
    _, done = _in_thread(lambda: _hold(lock.writing, []))
    assert done.wait(WAIT)


@pytest.fixture
def slow_save(monkeypatch):
    """DenseIndex.save blocks while ``release`` is clear, so a background save can be caught in the middle."""
    started, release = threading.Event(), threading.Event()
    release.set()
    real = DenseIndex.save

    def save(self, *args, **kwargs):
        started.set()
        release.wait(WAIT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DenseIndex, "save", save)
    yield started, release
    release.set()


def test_searches_go_on_while_an_edit_is_saved_in_the_background(tmp_path: Path, embedder, slow_save):
    kb = KnowledgeBase(tmp_path / "kb", KBSettings(), embedder)
    kb.upsert([FAQEntry(f"e{i}", f"How do I do thing number {i}?", f"Like this {i}.") for i in range(5)])
    started, release = slow_save
    started.clear()
    release.clear()
    kb.update("e1", answer="Like that, now.")  # one entry: searchable at once, saved in the background
    assert started.wait(WAIT)  # the background save is under way, and blocked
    hits: list[str] = []
    _, searched = _in_thread(lambda: hits.append(kb.search("thing number 1", 1)[0].entry.answer))
    assert searched.wait(WAIT) and hits == ["Like that, now."]
    # An edit, though, waits for the save: it must not change the indexes while they are written.
    _, edited = _in_thread(lambda: kb.update("e2", answer="Changed."))
    assert not edited.wait(0.3)
    release.set()
    assert edited.wait(WAIT)
    kb.close()
    reopened = KnowledgeBase(tmp_path / "kb", KBSettings(), embedder)
    assert reopened.search("thing number 2", 1)[0].entry.answer == "Changed."
