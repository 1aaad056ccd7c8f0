"""Typed readers for `TASKMUX_*` environment variables.

Each process builds one frozen settings object from these in its `__main__`, never at
import time. A bad value fails at start-up with the variable's name in the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

PREFIX = "TASKMUX_"


class SettingsError(ValueError):
    """An environment variable holds a value the process cannot use."""


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    """The variable `TASKMUX_<name>` as a string, or the default when unset or empty."""
    value = env.get(PREFIX + name, "").strip()
    return value or default


def env_int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int | None = None
) -> int:
    """The variable as an integer within [minimum, maximum]."""
    raw = env.get(PREFIX + name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise SettingsError(f"{PREFIX}{name}={value} must be {bound}")
    return value


def env_list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """The variable as a comma-separated list of non-empty items."""
    raw = env.get(PREFIX + name, "").strip()
    if not raw:
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe to log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
