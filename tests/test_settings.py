"""Settings: defaults < data-dir TOML < --config TOML < SUPPORTBOT_* env < CLI; all problems at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatbot.settings import Settings, load_settings, write_data_dir_config
from knowledge_base.errors import ConfigError


def test_defaults_need_no_environment():
    settings = load_settings(env={})
    assert settings.data_dir == Path("supportbot-data")
    assert settings.model.device == "auto" and settings.kb.retrieval == "hybrid"


def test_sources_apply_in_order(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        "[policy]\nfaq_threshold = 0.9\n[kb]\ntop_k = 7\n[model]\nmax_new_tokens = 50\n", encoding="utf-8"
    )
    env = {"SUPPORTBOT_KB_TOP_K": "9", "SUPPORTBOT_DATA_DIR": str(tmp_path / "d"), "SUPPORTBOT_POLICY_GENERATE": "no"}
    settings = load_settings(env=env, config_file=config, overrides={"model.max_new_tokens": "20"})
    assert settings.policy.faq_threshold == 0.9
    assert settings.kb.top_k == 9
    assert settings.model.max_new_tokens == 20
    assert settings.policy.generate is False
    assert settings.data_dir == tmp_path / "d"


def test_data_dir_config_is_read_and_written_atomically(tmp_path):
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    write_data_dir_config(settings, {"policy": {"faq_threshold": 0.81, "relevance_threshold": 0.6}})
    again = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    assert (again.policy.faq_threshold, again.policy.relevance_threshold) == (0.81, 0.6)
    assert not list(tmp_path.glob("*.tmp"))


def test_every_problem_is_reported_at_once_with_key_and_fix(tmp_path):
    env = {
        "SUPPORTBOT_KB_TOP_K": "many",
        "SUPPORTBOT_MODEL_DEVCE": "cpu",
        "SUPPORTBOT_POLICY_FAQ_THRESHOLD": "1.5",
        "SUPPORTBOT_MODEL_BACKEND": "openai",
        "SUPPORTBOT_KB_ANSWER_TOKENS": "3",
    }
    with pytest.raises(ConfigError) as err:
        load_settings(env=env, overrides={"server.port": "99999", "model.dtype": "int3"})
    text = str(err.value)
    for fragment in (
        "SUPPORTBOT_KB_TOP_K",
        "did you mean 'SUPPORTBOT_MODEL_DEVICE'",
        "policy.faq_threshold",
        "model.openai_base_url",
        "server.port",
        "'int3' is not one of",
        "kb.answer_tokens",
    ):
        assert fragment in text
    assert len(err.value.problems) == 7


def test_a_broken_toml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy\nfaq_threshold = ", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_settings(env={}, config_file=bad)


def test_settings_are_frozen_and_replace_returns_a_copy():
    settings = Settings()
    changed = settings.replace(policy={"faq_threshold": 0.9})
    assert settings.policy.faq_threshold != 0.9 and changed.policy.faq_threshold == 0.9
    with pytest.raises(AttributeError):
        settings.policy.faq_threshold = 0.1  # type: ignore[misc]


def test_secrets_are_masked_for_display():
    settings = Settings().replace(model={"openai_api_key": "sk-123"})
    assert settings.to_dict()["model"]["openai_api_key"] == "***"
