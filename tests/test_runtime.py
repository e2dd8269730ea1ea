"""Thread defaults that hold under load (#15 item 9): the process sets torch's threads itself."""

from __future__ import annotations

import pytest
import torch

from chatbot import cli
from chatbot.runtime import apply_threads, thread_count
from chatbot.settings import Settings


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_is_one_thread_for_serving_and_the_default_for_batch_jobs(settings: Settings) -> None:
    assert thread_count(settings, serving=True, env={}) == 1
    assert thread_count(settings, serving=False, env={}) is None
    assert thread_count(settings, serving=True, env={"OMP_NUM_THREADS": "3"}) is None  # the operator chose
    assert thread_count(settings.replace(runtime={"threads": 2}), serving=True, env={"OMP_NUM_THREADS": "3"}) == 2
    assert thread_count(settings.replace(model={"threads": 3}), serving=False, env={}) == 3  # the older name


def test_the_setting_reaches_torch_without_any_model_loaded(settings: Settings, restore_threads) -> None:
    torch.set_num_threads(2)
    assert apply_threads(settings, serving=True, env={}) == 1
    assert torch.get_num_threads() == 1
    apply_threads(settings.replace(runtime={"threads": 2}), serving=False, env={})
    assert torch.get_num_threads() == 2


def test_the_cli_applies_it_before_the_command_runs(tmp_path, restore_threads, capsys) -> None:
    torch.set_num_threads(2)
    code = cli.main(["kb", "stats", "--data-dir", str(tmp_path), "--set", "runtime.threads=1", "--json"])
    assert code == 0 and torch.get_num_threads() == 1


def test_bad_thread_counts_are_refused(tmp_path) -> None:
    from chatbot.settings import load_settings
    from knowledge_base.errors import ConfigError

    with pytest.raises(ConfigError, match=r"runtime\.threads"):
        load_settings(env={}, overrides={"data_dir": str(tmp_path), "runtime.threads": -1})
