"""Process-wide runtime defaults: how many CPU threads torch and OpenMP use.

torch's default (one thread per core) collapses when any other process is busy: on the 2-core
reference machine, `faq` answers went from p95 44 ms at one thread to 555 ms at the default with a
busy neighbour (#15 item 9; PITFALLS #21), because the two OpenMP workers spin-wait for each other
while one of them is descheduled. A request path runs small batches (one question's embedding), so
one thread costs it nothing on an idle machine and keeps it fast on a busy one.

``runtime.threads`` sets it for everything torch does in the process: the embedder, the generator,
evaluation and fine-tuning. ``0`` (the default) means *auto*: 1 thread for the serving commands
(``serve``, ``chat``, where latency matters), torch's default for the batch commands (``finetune``,
``kb add``, ``eval``, ``calibrate``), unless ``OMP_NUM_THREADS`` is set. ``model.threads`` (older)
counts as ``runtime.threads`` when it is above 0.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

from chatbot.settings import Settings

__all__ = ["SERVING_COMMANDS", "apply_threads", "thread_count"]

#: Commands that answer customers: latency under load matters more than batch throughput.
SERVING_COMMANDS = frozenset({"serve", "chat"})


def thread_count(settings: Settings, *, serving: bool, env: Mapping[str, str] | None = None) -> int | None:
    """The threads to use, or None to leave torch's default (auto on a batch command, or
    ``OMP_NUM_THREADS`` already chosen by whoever started the process)."""
    explicit = settings.model.threads or settings.runtime.threads
    if explicit:
        return int(explicit)
    if env is not None and env.get("OMP_NUM_THREADS"):
        return None
    return 1 if serving else None


def apply_threads(settings: Settings, *, serving: bool, env: Mapping[str, str] | None = None) -> int | None:
    """Set the process's thread count (see :func:`thread_count`); returns it (None: unchanged).

    Only ``torch.set_num_threads``: it holds for every thread of the process (the request threads,
    the generator's), and unlike ``OMP_NUM_THREADS`` it is not inherited by child processes (a
    fine-tuning run started from the console keeps its own, batch, default)."""
    count = thread_count(settings, serving=serving, env=env)
    if count is None:
        return None
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(count)
    return count
