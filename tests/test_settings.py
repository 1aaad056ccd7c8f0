"""Settings come from TASKMUX_* variables, with clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import GatewaySettings
from taskmux.config import SettingsError, redact_url
from workers.settings import WorkerSettings


def test_defaults_without_environment() -> None:
    settings = GatewaySettings.from_env({})
    assert settings.max_texts_per_request == GatewaySettings().max_texts_per_request
    assert settings.gateway_id  # generated


def test_values_are_read_and_typed() -> None:
    env = {"TASKMUX_MAX_TEXT_CHARS": "77", "TASKMUX_REDIS_URL": "redis://h:1/2"}
    settings = GatewaySettings.from_env(env)
    assert settings.max_text_chars == 77
    assert settings.redis.url == "redis://h:1/2"
    worker = WorkerSettings.from_env({"TASKMUX_MODEL_REPO": "/m", "TASKMUX_PROVIDERS": "A, B"})
    assert worker.model_repo == Path("/m")
    assert worker.providers == ("A", "B")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("MAX_TEXT_CHARS", "lots", "not an integer"), ("MAX_TEXT_CHARS", "0", "must be >= 1")],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"TASKMUX_{name}.*{message}"):
        GatewaySettings.from_env({f"TASKMUX_{name}": value})


def test_secrets_are_redacted() -> None:
    assert redact_url("redis://user:hunter2@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:hunter2@host/0") == "redis://:***@host/0"
    assert redact_url("redis://host:6379") == "redis://host:6379"
    settings = GatewaySettings.from_env({"TASKMUX_REDIS_URL": "redis://:hunter2@h:1/0"})
    assert "hunter2" not in settings.describe()
