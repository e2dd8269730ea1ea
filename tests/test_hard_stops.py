"""Hard stops: ``kill -9`` of ``supportbot kb add`` at several points loses nothing acknowledged.

The command runs in a subprocess with the fake embedder (slowed a little, so that the kills land
during the embedding), prints its progress as JSON lines on stderr (``--json``), and is killed:
right after the first progress line (the entries are committed, nothing embedded), during the
embedding, and once the embedding has finished (while the index files are written). After each
kill the knowledge base must open, ``kb stats`` agree with ``kb list``, every entry be found by its
own question, the embedding resume from its last checkpoint, and a second upload complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HashingEmbedder

from knowledge_base.kb import KnowledgeBase
from knowledge_base.settings import KBSettings

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RUNNER = f"""
import sys, time
sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]
from conftest import HashingEmbedder
from chatbot import cli, services

class Slow(HashingEmbedder):
    def embed_batch(self, texts):
        time.sleep(0.0006 * len(texts))
        return super().embed_batch(texts)

services.make_embedder = lambda settings: Slow()
sys.exit(cli.main(sys.argv[1:]))
"""


def _faq(path: Path, n: int) -> Path:
    rows = [
        f"q{i:05d},How do I use feature number {i} of gadget {i % 97}?,Open settings and enable option {i}.\n"
        for i in range(n)
    ]
    path.write_text("id,question,answer\n" + "".join(rows), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTBOT_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _add(data: Path, faq: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, "kb", "add", "--data-dir", str(data), str(faq), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _kill_at(proc: subprocess.Popen[str], when: str) -> str:
    """Read progress lines until ``when`` ("first", "middle", "embedded"), then kill -9."""
    assert proc.stderr is not None
    first = None
    for line in proc.stderr:
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        first = first or time.monotonic()
        done = event["done"] >= event["total"]
        if when == "first" or (when == "middle" and time.monotonic() - first > 1.5 and not done):
            break
        if when == "embedded" and done:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return "killed" if proc.returncode == -signal.SIGKILL else f"finished ({proc.returncode})"


@pytest.mark.parametrize("when", ["first", "middle", "embedded"])
def test_kill_9_during_an_upload_loses_nothing(tmp_path: Path, when: str) -> None:
    data = tmp_path / "data"
    faq = _faq(tmp_path / "faq.csv", 5_000)
    outcome = _kill_at(_add(data, faq), when)

    embedder = HashingEmbedder()
    started = time.perf_counter()
    kb = KnowledgeBase(data / "kb", KBSettings(), embedder, background=False)
    reopen_s = time.perf_counter() - started
    entries = kb.entries()
    assert kb.stats()["entries"] == len(entries) == kb.stats()["enabled"]
    assert len(entries) in (0, 5_000)  # one transaction: all of the file or none of it
    # Resumed, not redone: at most one checkpoint of texts is embedded again (each entry has a
    # question and a whole-entry text).
    if when != "first":
        assert embedder.texts_embedded < 2 * 5_000 - KnowledgeBase.EMBED_CHECKPOINT, (when, outcome)
    for entry in entries[::250]:
        assert kb.search(entry.question, 1)[0].entry.id == entry.id
    kb.close()
    print(f"kill at {when}: {outcome}; reopened in {reopen_s:.2f} s, {embedder.texts_embedded} texts embedded")

    again = _add(data, faq)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    report = json.loads(out)
    assert report["total"] == 5_000 and report["added"] + report["unchanged"] == 5_000
