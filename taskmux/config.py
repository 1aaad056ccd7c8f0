"""Typed readers for `TASKMUX_*` environment variables.

Each process builds one frozen settings object from these in its `__main__`, never at
import time. A bad value fails at start-up with the variable's name in the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
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


def env_float(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float
) -> float:
    """The variable as a number within [minimum, maximum]."""
    raw = env.get(PREFIX + name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a number") from None
    if not minimum <= value <= maximum:
        bound = f"between {minimum:g} and {maximum:g}"
        raise SettingsError(f"{PREFIX}{name}={value:g} must be {bound}")
    return value


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """The variable as a yes/no: 1/true/yes/on or 0/false/no/off, any case."""
    raw = env.get(PREFIX + name, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    words = "/".join(TRUE_WORDS + FALSE_WORDS)
    raise SettingsError(f"{PREFIX}{name}={raw!r} is not one of {words}")


def env_on_off_auto(env: Mapping[str, str], name: str, default: str) -> str:
    """The variable as "on", "off" (any word `env_bool` takes) or "auto"."""
    raw = env.get(PREFIX + name, "").strip().lower()
    if not raw:
        return default
    if raw == "auto":
        return "auto"
    if raw in TRUE_WORDS + FALSE_WORDS:
        return "on" if raw in TRUE_WORDS else "off"
    words = "/".join((*TRUE_WORDS, *FALSE_WORDS, "auto"))
    raise SettingsError(f"{PREFIX}{name}={raw!r} is not one of {words}")


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


class Secret:
    """A secret string that prints as `***` (str, repr, f-strings, logs); `reveal()` reads it."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one call that needs it."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    def __str__(self) -> str:
        return "***" if self._value else ""


def env_secret(env: Mapping[str, str], name: str) -> Secret:
    """`TASKMUX_<name>`, or the contents of the file `TASKMUX_<name>_FILE` (a mounted
    Kubernetes Secret); setting both is an error, and neither gives an empty Secret."""
    value = env.get(PREFIX + name, "")
    path = env.get(f"{PREFIX}{name}_FILE", "").strip()
    if value and path:
        raise SettingsError(f"set {PREFIX}{name} or {PREFIX}{name}_FILE, not both")
    if not path:
        return Secret(value)
    try:
        # Only the line break that `echo` or an editor adds is dropped; a secret may
        # legitimately start or end with other whitespace.
        text = Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise SettingsError(f"{PREFIX}{name}_FILE={path}: cannot read it ({reason})") from None
    if not text:
        raise SettingsError(f"{PREFIX}{name}_FILE={path} is empty")
    return Secret(text)
