"""Process-wide logging: one JSON object per line (or plain text), with request context.

Each JSON line has `time`, `level`, `logger` and `message`, and, where known,
`request_id`, `head` and `tenant` (from `log_context` or a call's `extra=`). Request texts
and keys are never written unless TASKMUX_LOG_TEXTS=1.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

CONTEXT_FIELDS = ("request_id", "head", "tenant")
SECRET_FIELDS = ("texts", "text", "key", "idempotency_key", "api_key")
_context: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "taskmux_log_context", default=()
)


@contextlib.contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Add `request_id`, `head` or `tenant` to every line logged inside the block."""
    merged = {**dict(_context.get()), **{k: v for k, v in fields.items() if v}}
    token = _context.set(tuple(merged.items()))
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, *, texts: bool = False) -> None:
        super().__init__()
        self._texts = texts

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(dict(_context.get()))
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                line[name] = str(value)
        if self._texts:
            for name in SECRET_FIELDS:
                if (value := getattr(record, name, None)) is not None:
                    line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, json: bool, *, texts: bool = False) -> None:
    """Configure the root logger once per process: JSON lines or plain text, at `level`."""
    handler = logging.StreamHandler()
    if json:
        handler.setFormatter(JsonFormatter(texts=texts))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def configure_from_env(env: Mapping[str, str], *, default_format: str) -> None:
    """`configure_logging` from TASKMUX_LOG_LEVEL, TASKMUX_LOG_FORMAT (json|text) and
    TASKMUX_LOG_TEXTS (1 writes request texts and keys; never in production)."""
    log_format = env.get("TASKMUX_LOG_FORMAT", default_format).lower()
    if log_format not in ("json", "text"):
        raise ValueError(f"TASKMUX_LOG_FORMAT is {log_format!r}; it must be json or text")
    configure_logging(
        env.get("TASKMUX_LOG_LEVEL", "INFO"),
        log_format == "json",
        texts=env.get("TASKMUX_LOG_TEXTS", "") == "1",
    )
