"""Background jobs for the console: one fine-tuning run at a time, in its own process.

The console's fine-tune tab starts a run, shows its live progress and loss curve, and can stop it;
the web server keeps answering meanwhile. The training happens in a child process (``python -m
ui.jobs finetune ...``), so a crash or an out-of-memory kill takes down the run, never the server,
and the GIL is not shared with the chat.

* :class:`JobRunner` starts a command, reads its output line by line in a thread and keeps a
  snapshot (:class:`JobStatus`): phase, step, loss history, result or error, the log tail. Lines
  that are JSON objects with an ``"event"`` key are progress events; anything else is log text.
  One job at a time: :meth:`JobRunner.start` refuses a second one while the first runs.
  :meth:`JobRunner.cancel` sends SIGINT, which the training loop turns into a checkpoint and a
  clean exit (resume it later), then kills the process if it does not stop in time.
* :func:`finetune_command` builds the child's command line, :func:`settings_env` hands the
  server's settings to it (as ``SUPPORTBOT_*`` variables, so secrets never appear on a command
  line), and :func:`main` is the child: :func:`finetune.train.run_finetune` with every progress
  dict printed as a JSON line.
* :func:`dataset_preview`: what a run would train on (counts per source and split), without
  loading a model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chatbot.settings import SECTIONS, Settings
from knowledge_base.errors import SupportBotError

__all__ = [
    "JobBusyError",
    "JobRunner",
    "JobStatus",
    "dataset_preview",
    "finetune_command",
    "main",
    "retriever_command",
    "settings_env",
]

#: Final states of a job.
FINISHED = ("succeeded", "failed", "interrupted")
#: The last job's status in the log folder (JSON), so a reload or restart of the console shows it.
STATE_FILE = "last-job.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobBusyError(SupportBotError):
    """A job is running already; the runner takes one at a time."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class JobStatus:
    """A snapshot of a job, safe to read from any thread (the runner hands out copies)."""

    name: str
    argv: list[str]
    state: str = "running"
    """``"running"``, ``"succeeded"``, ``"failed"`` or ``"interrupted"``."""
    started_at: str = ""
    finished_at: str = ""
    returncode: int | None = None
    pid: int | None = None
    phase: str = "starting"
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    log_tail: list[str] = field(default_factory=list)
    log_file: str = ""
    checkpoint: str | None = None
    """The checkpoint a stopped run left (from the child's ``interrupted`` event); None: none saved."""

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        """Share of the training steps done, in [0, 1]."""
        if self.state == "succeeded":
            return 1.0
        return min(self.step / self.total_steps, 1.0) if self.total_steps else 0.0

    def summary(self) -> str:
        """One line for people: what the job is doing or how it ended."""
        if self.state == "running":
            if self.phase == "training" and self.total_steps:
                eta = f", about {self.eta_s / 60:.0f} min left" if self.eta_s else ""
                last = f", loss {self.losses[-1][1]:.3f}" if self.losses else ""
                return f"{self.name}: training, step {self.step}/{self.total_steps}{last}{eta}"
            return f"{self.name}: {self.phase}…"
        if self.state == "succeeded":
            return f"{self.name}: finished at {self.finished_at[11:16]} UTC ({self.finished_at[:10]})"
        if self.state == "interrupted":
            where = f"stopped at step {self.step}/{self.total_steps}"
            if self.checkpoint:
                return f"{self.name}: {where}; checkpoint kept at {self.checkpoint}: resume it"
            return f"{self.name}: {where} before any checkpoint was saved: nothing to resume, start it again"
        message = (self.error or {}).get("message") or f"exit status {self.returncode}"
        return f"{self.name}: failed: {message}"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fraction"] = self.fraction
        return out


class JobRunner:
    """Runs one background command at a time and tracks its progress events.

    ``log_dir``: where each job's full output is kept (``<name>-<time>.log``). ``log_lines``: how
    many lines of output the snapshot keeps.
    """

    def __init__(self, log_dir: Path | str, *, log_lines: int = 200) -> None:
        self.log_dir = Path(log_dir)
        self._log_lines = log_lines
        self._lock = threading.Lock()
        self._status: JobStatus | None = None
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=log_lines)
        self._restore()

    # -- the last job survives a reload and a restart ---------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.log_dir / STATE_FILE

    def _save(self) -> None:
        """Write the current status (lock held) atomically: the console shows it after a restart."""
        if self._status is None:
            return
        from knowledge_base.atomic import atomic_write_text

        payload = {**dataclasses.asdict(self._status), "log_tail": list(self._tail)}
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.state_file, json.dumps(payload, ensure_ascii=False, default=str))
        except OSError:  # the run goes on; only the after-restart view is lost
            pass

    def _restore(self) -> None:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            known = {f.name for f in dataclasses.fields(JobStatus)}
            status = JobStatus(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError):
            return
        status.losses = [tuple(x) for x in status.losses]  # type: ignore[misc]
        status.eval_losses = [tuple(x) for x in status.eval_losses]  # type: ignore[misc]
        if status.running:
            # The server stopped while the run was going: its process is gone with it (or orphaned
            # and unreadable); say so instead of showing it running forever.
            status.state, status.phase = "interrupted", "stopped"
            status.finished_at = status.finished_at or _now()
            status.error = {"message": "the server stopped while this run was going", "fix": "resume it"}
            if status.pid and _alive(status.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(status.pid, signal.SIGINT)  # let it save a checkpoint and exit
        self._status = status
        self._tail = deque(status.log_tail, maxlen=self._log_lines)

    # -- starting and stopping ------------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> JobStatus:
        """Start ``argv`` in the background; raises JobBusyError while another job runs."""
        with self._lock:
            if self._status is not None and self._status.running:
                raise JobBusyError(
                    f"{self._status.name!r} is still running",
                    fix="wait for it to finish, or stop it first",
                )
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            log_path = self.log_dir / f"{name}-{stamp}.log"
            log_file = log_path.open("w", encoding="utf-8")
            try:
                process = subprocess.Popen(
                    list(argv),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    encoding="utf-8",
                    errors="replace",
                    bufsize=1,
                    env=dict(env) if env is not None else None,
                    cwd=str(cwd) if cwd is not None else None,
                )
            except OSError as exc:
                log_file.close()
                raise SupportBotError(f"cannot start {argv[0]!r}: {exc}", fix="check the installation") from exc
            self._process = process
            self._tail = deque(maxlen=self._log_lines)
            self._status = JobStatus(
                name=name, argv=list(argv), started_at=_now(), pid=process.pid, log_file=str(log_path)
            )
            self._reader = threading.Thread(
                target=self._read, args=(process, log_file), name=f"job-{name}", daemon=True
            )
            self._reader.start()
            self._save()
            return self._snapshot()

    def cancel(self, *, grace_s: float = 60.0) -> bool:
        """Ask the running job to stop (SIGINT: it saves a checkpoint), kill it after ``grace_s``.

        Returns False when nothing was running."""
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None or self._status is None or not self._status.running:
                return False
            self._status.phase = "stopping"
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)

        def kill_later() -> None:
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

        threading.Thread(target=kill_later, name="job-kill", daemon=True).start()
        return True

    def status(self) -> JobStatus | None:
        """A copy of the current (or last) job's status; None before the first job."""
        with self._lock:
            return self._snapshot() if self._status is not None else None

    def wait(self, timeout: float | None = None) -> JobStatus | None:
        """Block until the job's output is read to the end (for tests and scripts)."""
        reader = self._reader
        if reader is not None:
            reader.join(timeout)
        return self.status()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._status is not None and self._status.running

    # -- internals --------------------------------------------------------------------------------

    def _snapshot(self) -> JobStatus:
        assert self._status is not None
        copy = dataclasses.replace(
            self._status,
            argv=list(self._status.argv),
            losses=list(self._status.losses),
            eval_losses=list(self._status.eval_losses),
            log_tail=list(self._tail),
        )
        return copy

    def _read(self, process: subprocess.Popen[str], log_file: IO[str]) -> None:
        assert process.stdout is not None
        with log_file, process.stdout:
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()
                self._handle(line.rstrip("\n"))
            returncode = process.wait()
        with self._lock:
            status = self._status
            if status is None:
                return
            status.returncode = returncode
            status.finished_at = _now()
            if returncode == 0 and status.error is None:
                status.state = "succeeded"
                status.phase = "done"
            elif status.phase in ("stopping", "interrupted") or returncode in (130, -signal.SIGINT):
                status.state = "interrupted"
                status.phase = "stopped"
            else:
                status.state = "failed"
                status.phase = "failed"
                if status.error is None:
                    status.error = {"message": f"the process exited with status {returncode}", "fix": "see the log"}
            self._save()

    def _handle(self, line: str) -> None:
        event: Any = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
        with self._lock:
            status = self._status
            if status is None:
                return
            if not isinstance(event, dict) or "event" not in event:
                if line.strip():
                    self._tail.append(line)
                return
            kind = event["event"]
            if kind == "phase":
                if status.phase != "stopping":
                    status.phase = str(event.get("phase", status.phase))
                self._tail.append(f"[{event.get('phase')}]")
            elif kind == "step":
                status.phase = "training" if status.phase != "stopping" else status.phase
                status.step = int(event.get("step", status.step))
                status.total_steps = int(event.get("total_steps", status.total_steps))
                status.epoch = float(event.get("epoch", status.epoch))
                eta = event.get("eta_s")
                status.eta_s = float(eta) if isinstance(eta, (int, float)) else None
                if isinstance(event.get("loss"), (int, float)):
                    status.losses.append((status.step, float(event["loss"])))
                if isinstance(event.get("eval_loss"), (int, float)):
                    status.eval_losses.append((status.step, float(event["eval_loss"])))
            elif kind == "result":
                status.result = {k: v for k, v in event.items() if k != "event"}
            elif kind == "error":
                status.error = {k: v for k, v in event.items() if k != "event"}
                self._tail.append(f"error: {event.get('message', '')}")
            elif kind == "interrupted":
                status.phase = "interrupted"
                status.step = int(event.get("step", status.step) or status.step)
                checkpoint = event.get("checkpoint")
                status.checkpoint = str(checkpoint) if checkpoint else None
                self._tail.append(
                    f"stopped at step {status.step}; checkpoint {checkpoint}"
                    if checkpoint
                    else f"stopped at step {status.step}; no checkpoint was saved yet"
                )
            if kind in ("phase", "result", "error", "interrupted") or (kind == "step" and status.step % 5 == 0):
                self._save()


# -- the fine-tuning job ---------------------------------------------------------------------------


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment that rebuilds ``settings`` in a child process.

    Every ``SUPPORTBOT_*`` variable of ``base`` (default ``os.environ``) is dropped and each setting
    that differs from its default is set, so the child sees exactly the server's settings, however
    they were given (flags, TOML, environment), secrets included but off the command line.
    """
    env = {k: v for k, v in (base if base is not None else os.environ).items() if not k.startswith("SUPPORTBOT_")}
    env["SUPPORTBOT_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    for section, cls in SECTIONS.items():
        current, default = getattr(settings, section), cls()
        for f in dataclasses.fields(cls):
            value = getattr(current, f.name)
            if value == getattr(default, f.name):
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            env[f"SUPPORTBOT_{section.upper()}_{f.name.upper()}"] = text
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def finetune_command(
    output: str,
    *,
    from_kb: bool = True,
    from_conversations: bool = False,
    epochs: float | None = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    rank: int | None = None,
    resume: bool = False,
    restart: bool = False,
    overwrite: bool = False,
    activate: bool = False,
    eval_items: int | None = None,
    answer_eval: bool = True,
    python: str | None = None,
) -> list[str]:
    """The command line of a fine-tuning job (run it with :func:`settings_env`'s environment)."""
    from chatbot.adapters import validate_adapter_name

    validate_adapter_name(output)
    if not from_kb and not from_conversations:
        raise SupportBotError("no training data chosen", fix="tick the knowledge base and/or curated conversations")
    argv = [python or sys.executable, "-m", "ui.jobs", "finetune", "--output", output]
    flags = {
        "--from-kb": from_kb,
        "--from-conversations": from_conversations,
        "--resume": resume,
        "--restart": restart,
        "--overwrite": overwrite,
        "--activate": activate,
        "--no-answer-eval": not answer_eval,
    }
    argv += [flag for flag, on in flags.items() if on]
    values = {
        "--epochs": epochs,
        "--max-steps": max_steps,
        "--lr": learning_rate,
        "--rank": rank,
        "--eval-items": eval_items,
    }
    argv += [item for flag, value in values.items() if value is not None for item in (flag, str(value))]
    return argv


def retriever_command(
    output: str,
    *,
    epochs: float | None = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    reranker: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    activate: bool = False,
    python: str | None = None,
) -> list[str]:
    """The command line of a retriever fine-tune job. The flags are checked here by the same
    builder the CLI uses (`finetune.retriever.RetrieverRequest.from_args`), so a bad value is
    refused before a process starts, with the CLI's message."""
    from finetune.retriever import RetrieverRequest

    values: dict[str, Any] = {
        "--epochs": epochs,
        "--max-steps": max_steps,
        "--lr": learning_rate,
        "--reranker": reranker,
    }
    flags = {"--resume": resume, "--overwrite": overwrite, "--activate": activate}
    argv = ["--output", output]
    argv += [flag for flag, on in flags.items() if on]
    argv += [item for flag, value in values.items() if value is not None for item in (flag, str(value))]
    try:
        args = _retriever_parser().parse_args(argv)
    except argparse.ArgumentError as exc:
        raise SupportBotError(str(exc), fix="check the retriever fine-tune fields") from exc
    RetrieverRequest.from_args(args)
    return [python or sys.executable, "-m", "ui.jobs", "finetune-retriever", *argv]


def _retriever_parser() -> argparse.ArgumentParser:
    from finetune.retriever import add_retriever_arguments

    parser = argparse.ArgumentParser(prog="python -m ui.jobs finetune-retriever", exit_on_error=False)
    parser.add_argument("--output", required=True)
    for flag in ("--resume", "--overwrite", "--activate"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--lr", type=float)
    add_retriever_arguments(parser)
    return parser


def _finetune_retriever(argv: Sequence[str]) -> int:
    from chatbot.settings import load_settings
    from finetune.retriever import RetrieverRequest
    from finetune.train import TrainingInterrupted

    try:
        settings = load_settings()
        request = RetrieverRequest.from_args(_retriever_parser().parse_args(list(argv)))
    except SupportBotError as exc:
        _emit({"event": "error", **exc.to_dict()})
        return 2
    _emit({"event": "phase", "phase": "starting", "pid": os.getpid()})
    try:
        result = request.run(settings, on_progress=_emit)
    except TrainingInterrupted as exc:
        _emit({"event": "interrupted", "step": exc.step, "total_steps": exc.total_steps, "checkpoint": exc.checkpoint})
        return 130
    except KeyboardInterrupt:
        _emit({"event": "interrupted", "step": 0, "total_steps": 0, "checkpoint": None})
        return 130
    except SupportBotError as exc:
        _emit({"event": "error", **exc.to_dict()})
        return 2
    except Exception as exc:  # the traceback goes to the log; the console shows the message
        _emit({"event": "error", "error": type(exc).__name__, "message": str(exc), "fix": "see the log"})
        raise
    _emit({"event": "result", **result.to_dict()})
    return 0


def dataset_preview(
    entries: Sequence[Any],
    conversation_pairs: Sequence[Any],
    settings: Settings,
    *,
    from_kb: bool = True,
    from_conversations: bool = True,
    sample: int = 8,
) -> dict[str, Any]:
    """What a fine-tune would train on: counts per source, the train/eval split, sample pairs.

    ``entries``: the knowledge base's entries; ``conversation_pairs``:
    ``ConversationStore.training_pairs()``. Loads no model (the retriever is lexical).
    """
    from finetune.data import DataError, lexical_retriever, pairs_from_conversations, pairs_from_entries, prepare_data

    live = [e for e in entries if e.enabled]
    kb_pairs = pairs_from_entries(live) if from_kb else []
    conv_pairs = pairs_from_conversations(conversation_pairs, live) if from_conversations else []
    origins = [str(getattr(p, "origin", "")) for p in conversation_pairs]
    out: dict[str, Any] = {
        "entries": len(live),
        "kb_pairs": len(kb_pairs),
        "conversation_pairs": len(conv_pairs),
        "thumbs_up": origins.count("thumbs_up") if from_conversations else 0,
        "corrections": origins.count("correction") if from_conversations else 0,
        "samples": [
            {"question": p.question, "answer": p.answer, "source": p.source} for p in (conv_pairs + kb_pairs)[:sample]
        ],
        "problems": [],
    }
    pairs = kb_pairs + conv_pairs
    if not pairs:
        out["problems"] = ["no question/answer pairs: add FAQ entries, or collect thumbs-up answers and corrections"]
        return out
    ft = settings.finetune
    try:
        prepared = prepare_data(
            pairs,
            layout=ft.layout,
            eval_fraction=ft.eval_fraction,
            seed=ft.seed,
            retrieve=lexical_retriever(live, settings.policy.max_context_entries),
            k=settings.policy.max_context_entries,
        )
    except DataError as exc:
        out["problems"] = [str(p) for p in exc.problems]
        return out
    out.update(prepared.stats)
    return out


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _finetune(args: argparse.Namespace) -> int:
    from chatbot.settings import load_settings
    from finetune.train import FinetuneRequest, TrainingInterrupted, run_finetune

    try:
        settings = load_settings()
    except SupportBotError as exc:
        _emit({"event": "error", **exc.to_dict()})
        return 2
    changes: dict[str, Any] = {}
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.lr is not None:
        changes["learning_rate"] = args.lr
    if args.rank is not None:  # alpha follows the rank (alpha = 2r), as in the default settings
        changes["rank"] = args.rank
        changes["alpha"] = 2 * args.rank
    if changes:
        settings = settings.replace(finetune=changes)
    request = FinetuneRequest.from_args(args)
    _emit({"event": "phase", "phase": "starting", "pid": os.getpid()})
    try:
        result = run_finetune(settings, request, on_progress=_emit, progress_bar=False)
    except TrainingInterrupted as exc:
        _emit({"event": "interrupted", "step": exc.step, "total_steps": exc.total_steps, "checkpoint": exc.checkpoint})
        return 130
    except KeyboardInterrupt:
        _emit({"event": "interrupted", "step": 0, "total_steps": 0, "checkpoint": None})
        return 130
    except SupportBotError as exc:
        _emit({"event": "error", **exc.to_dict()})
        return 2
    except Exception as exc:  # the traceback goes to the log; the console shows the message
        _emit({"event": "error", "error": type(exc).__name__, "message": str(exc), "fix": "see the log"})
        raise
    _emit({"event": "result", **result.to_dict()})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ui.jobs finetune ...``: the child process of a console fine-tune
    (``finetune-retriever ...``: of a retriever fine-tune)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["finetune-retriever"]:
        started = time.perf_counter()
        code = _finetune_retriever(argv[1:])
        print(f"job finished in {time.perf_counter() - started:.0f} s with status {code}", file=sys.stderr)
        return code
    parser = argparse.ArgumentParser(prog="python -m ui.jobs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    ft = sub.add_parser("finetune", help="run finetune.train.run_finetune, printing JSON progress lines")
    ft.add_argument("--output", required=True)
    for flag in ("--from-kb", "--from-conversations", "--resume", "--restart", "--overwrite", "--activate"):
        ft.add_argument(flag, action="store_true")
    ft.add_argument("--no-answer-eval", action="store_true")
    ft.add_argument("--epochs", type=float)
    ft.add_argument("--max-steps", type=int)
    ft.add_argument("--lr", type=float)
    ft.add_argument("--rank", type=int)
    ft.add_argument("--eval-items", type=int)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    code = _finetune(args)
    print(f"job finished in {time.perf_counter() - started:.0f} s with status {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
