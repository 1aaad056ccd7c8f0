"""Settings come from TASKMUX_* variables, with clear errors for bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.settings import GatewaySettings
from router.connection import RedisSettings
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
    assert not worker.ort_spin
    assert WorkerSettings.from_env({"TASKMUX_ORT_SPIN": "True"}).ort_spin
    assert not WorkerSettings.from_env({"TASKMUX_ORT_SPIN": "off"}).ort_spin
    assert worker.ort_spin_in_run == "auto"
    for raw, value in (("1", "on"), ("Off", "off"), ("AUTO", "auto")):
        assert WorkerSettings.from_env({"TASKMUX_ORT_SPIN_IN_RUN": raw}).ort_spin_in_run == value
    with pytest.raises(
        SettingsError, match=r"TASKMUX_ORT_SPIN_IN_RUN='sometimes' is not one of .*/off/auto"
    ):
        WorkerSettings.from_env({"TASKMUX_ORT_SPIN_IN_RUN": "sometimes"})


def test_a_yes_no_setting_refuses_other_words() -> None:
    with pytest.raises(SettingsError, match="TASKMUX_ORT_SPIN='maybe' is not one of 1/true"):
        WorkerSettings.from_env({"TASKMUX_ORT_SPIN": "maybe"})


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


def test_redis_credentials_leave_the_url_and_print_as_stars() -> None:
    env = {"TASKMUX_REDIS_URL": "rediss://taskmux-gateway:s3cr%40t@h:6380/0"}
    settings = GatewaySettings.from_env(env)
    assert settings.redis.url == "rediss://h:6380/0"
    assert settings.redis.username == "taskmux-gateway"
    assert settings.redis.password.reveal() == "s3cr@t"
    assert settings.redis.client_options()["password"] == "s3cr@t"
    for text in (repr(settings), str(settings), settings.describe(), f"{settings.redis.password}"):
        assert "s3cr" not in text
    assert "user=taskmux-gateway auth=password tls=tls" in settings.describe()


def test_redis_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-a-secret\n")
    env = {"TASKMUX_REDIS_USERNAME": "taskmux-worker", "TASKMUX_REDIS_PASSWORD_FILE": str(secret)}
    worker = WorkerSettings.from_env(env)
    assert worker.redis.password.reveal() == "from-a-secret"
    assert "from-a-secret" not in repr(worker) + worker.describe()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TASKMUX_REDIS_PASSWORD": "hunter2", "TASKMUX_REDIS_PASSWORD_FILE": "/p"},
            "TASKMUX_REDIS_PASSWORD or TASKMUX_REDIS_PASSWORD_FILE, not both",
        ),
        (
            {"TASKMUX_REDIS_URL": "redis://:hunter2@h/0", "TASKMUX_REDIS_PASSWORD": "hunter2"},
            "TASKMUX_REDIS_URL holds a password",
        ),
        ({"TASKMUX_REDIS_PASSWORD_FILE": "/nonexistent"}, "_FILE=/nonexistent: cannot read it"),
        ({"TASKMUX_REDIS_URL": "http://:hunter2@h/0"}, "must start with redis://"),
        ({"TASKMUX_REDIS_TLS_CA_FILE": __file__}, "needs a rediss:// TASKMUX_REDIS_URL"),
        (
            {"TASKMUX_REDIS_URL": "rediss://h/0", "TASKMUX_REDIS_TLS_CERT_FILE": __file__},
            "set both TASKMUX_REDIS_TLS_CERT_FILE and TASKMUX_REDIS_TLS_KEY_FILE",
        ),
        (
            {"TASKMUX_REDIS_URL": "rediss://h/0", "TASKMUX_REDIS_TLS_CA_FILE": "/nope.pem"},
            "TASKMUX_REDIS_TLS_CA_FILE=/nope.pem is not a file",
        ),
    ],
)
def test_bad_redis_settings_name_the_variable_not_the_secret(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        GatewaySettings.from_env(env)
    assert "hunter2" not in str(info.value)


def test_redis_sentinels_replace_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "sentinel-password"
    secret.write_text("s3ntinel\n")
    env = {
        "TASKMUX_REDIS_SENTINELS": "10.0.0.5:26379, [::1]:26380,sentinel-2:26381",
        "TASKMUX_REDIS_USERNAME": "taskmux-worker",
        "TASKMUX_REDIS_PASSWORD": "hunter2",
        "TASKMUX_REDIS_SENTINEL_PASSWORD_FILE": str(secret),
        "TASKMUX_REDIS_TLS": "true",
    }
    redis = WorkerSettings.from_env(env).redis
    assert redis.sentinels == (("10.0.0.5", 26379), ("::1", 26380), ("sentinel-2", 26381))
    assert redis.master_name == "taskmux"
    assert redis.sentinel_options()["password"] == "s3ntinel"
    assert redis.sentinel_options()["ssl"] is True
    assert redis.client_options()["password"] == "hunter2"
    assert redis.client_options()["ssl_cert_reqs"] == "required"
    text = redis.describe()
    assert text.startswith("sentinel://10.0.0.5:26379,::1:26380,sentinel-2:26381/taskmux ")
    assert "tls=tls" in text
    assert "hunter2" not in text + repr(redis) and "s3ntinel" not in text + repr(redis)
    assert GatewaySettings.from_env({}).redis.sentinels == ()  # the default: a URL


def test_with_sentinels_a_url_still_gives_user_password_and_tls() -> None:
    """As the k8s `ha` overlay sets it: the base URL stays, the sentinels give the host."""
    env = {
        "TASKMUX_REDIS_SENTINELS": "taskmux-redis-sentinel:26379",
        "TASKMUX_REDIS_URL": "rediss://taskmux-worker:hunter2@taskmux-redis:6379/0",
    }
    redis = GatewaySettings.from_env(env).redis
    assert redis.sentinels == (("taskmux-redis-sentinel", 26379),)
    assert redis.username == "taskmux-worker" and redis.tls
    assert redis.client_options()["password"] == "hunter2"
    assert "hunter2" not in redis.describe()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TASKMUX_REDIS_SENTINELS": "h:26379", "TASKMUX_REDIS_URL": "redis://h/3"},
            "TASKMUX_REDIS_URL must name database 0 or none",
        ),
        ({"TASKMUX_REDIS_SENTINELS": "h"}, "'h' is not host:port"),
        ({"TASKMUX_REDIS_SENTINELS": "h:0"}, "'h:0' is not host:port"),
        ({"TASKMUX_REDIS_SENTINELS": "h:port"}, "'h:port' is not host:port"),
        ({"TASKMUX_REDIS_SENTINELS": "h:1", "TASKMUX_REDIS_TLS": "maybe"}, "must be true or false"),
        ({"TASKMUX_REDIS_TLS": "true"}, "use a rediss:// URL"),
        ({"TASKMUX_REDIS_SENTINEL_PASSWORD": "hunter2"}, "need TASKMUX_REDIS_SENTINELS"),
        (
            {"TASKMUX_REDIS_SENTINELS": "h:1", "TASKMUX_REDIS_TLS_CA_FILE": __file__},
            "TASKMUX_REDIS_TLS=true with TASKMUX_REDIS_SENTINELS",
        ),
    ],
)
def test_bad_sentinel_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)) as info:
        GatewaySettings.from_env(env)
    assert "hunter2" not in str(info.value)


def test_encoder_replicas_default_to_auto_and_refuse_bad_values() -> None:
    assert WorkerSettings.from_env({}).encoder_replicas == 0
    assert WorkerSettings.from_env({"TASKMUX_ENCODER_REPLICAS": "3"}).encoder_replicas == 3
    with pytest.raises(SettingsError, match="TASKMUX_ENCODER_REPLICAS=-1 must be between 0"):
        WorkerSettings.from_env({"TASKMUX_ENCODER_REPLICAS": "-1"})
    with pytest.raises(SettingsError, match="TASKMUX_ENCODER_REPLICAS='two' is not an integer"):
        WorkerSettings.from_env({"TASKMUX_ENCODER_REPLICAS": "two"})


@pytest.mark.parametrize(
    ("given", "url", "tls"),
    [
        ("REDISS://h:6380/0", "rediss://h:6380/0", True),
        ("Redis://user:pw@h:1/2", "redis://h:1/2", False),
        ("UNIX:///run/redis.sock", "unix:///run/redis.sock", False),
        # urlsplit reads "redis" past the control character; nothing may shift.
        ("\x01redis://h:1/0", "\x01redis://h:1/0", False),
    ],
)
def test_a_redis_url_scheme_is_read_in_any_case(given: str, url: str, tls: bool) -> None:
    # redis-py knows schemes in lower case only, and TLS is read from the scheme.
    settings = RedisSettings.from_env({"TASKMUX_REDIS_URL": given})
    assert (settings.url, settings.tls) == (url, tls)
