"""The console's fine-tuning run tells the truth and survives a reload (#15 item 7).

Stop reports the checkpoint the run really kept (or that none was saved), and the last run's
status is persisted, so a new runner (a reloaded console, a restarted server) shows it.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_ui import FAKE_JOB

from ui import jobs

#: Stopped while still evaluating the base model: no step, no checkpoint.
EARLY_STOP = textwrap.dedent(
    """
    import json, time
    print(json.dumps({"event": "phase", "phase": "evaluating the base model"}), flush=True)
    try:
        time.sleep(30)
    except KeyboardInterrupt:
        print(json.dumps({"event": "interrupted", "step": 0, "total_steps": 0, "checkpoint": None}), flush=True)
        raise SystemExit(130)
    """
)


def script(tmp_path: Path, text: str, name: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, str(path)]


def wait_for(runner: jobs.JobRunner, phase: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = runner.status()
        if status is not None and (status.phase == phase or status.losses):
            return
        time.sleep(0.05)
    raise AssertionError(f"the job never reached {phase!r}")


def test_stop_reports_the_real_checkpoint_and_a_new_runner_shows_it(tmp_path: Path) -> None:
    runner = jobs.JobRunner(tmp_path / "jobs")
    runner.start("v1", [*script(tmp_path, FAKE_JOB, "fake.py"), "slow"])
    wait_for(runner, "training")
    assert runner.cancel(grace_s=20)
    status = runner.wait(30)
    assert status is not None and status.state == "interrupted" and status.checkpoint == "ckpt"
    assert "checkpoint kept at ckpt" in status.summary()

    reloaded = jobs.JobRunner(tmp_path / "jobs").status()
    assert reloaded is not None
    assert (reloaded.name, reloaded.state, reloaded.checkpoint) == ("v1", "interrupted", "ckpt")
    assert reloaded.losses == status.losses and reloaded.summary() == status.summary()


def test_a_run_stopped_before_any_checkpoint_says_so(tmp_path: Path) -> None:
    runner = jobs.JobRunner(tmp_path / "jobs")
    runner.start("early", script(tmp_path, EARLY_STOP, "early.py"))
    wait_for(runner, "evaluating the base model")
    runner.cancel(grace_s=20)
    status = runner.wait(30)
    assert status is not None and status.state == "interrupted" and status.checkpoint is None
    assert "before any checkpoint was saved" in status.summary() and "resume it" not in status.summary()


def test_a_restart_during_a_run_shows_it_stopped_and_stops_the_orphan(tmp_path: Path) -> None:
    first = jobs.JobRunner(tmp_path / "jobs")
    started = first.start("v2", [*script(tmp_path, FAKE_JOB, "fake.py"), "slow"])
    wait_for(first, "training")
    after_restart = jobs.JobRunner(tmp_path / "jobs")  # what a restarted server's console sees
    status = after_restart.status()
    assert status is not None and status.name == "v2" and status.state == "interrupted"
    assert "server stopped" in status.summary() or "server stopped" in str(status.error)
    assert not after_restart.busy  # a new run may start
    final = first.wait(30)  # the orphan got SIGINT and saved its checkpoint
    assert final is not None and final.state == "interrupted" and started.pid


@pytest.mark.parametrize("broken", ["", "{not json", '{"name": 3}'])
def test_a_damaged_state_file_is_ignored(tmp_path: Path, broken: str) -> None:
    (tmp_path / jobs.STATE_FILE).write_text(broken)
    assert jobs.JobRunner(tmp_path).status() is None
