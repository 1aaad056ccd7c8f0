"""API keys: who is calling (a tenant) and which heads it may use.

Every TaskMux call must carry `authorization: Bearer <key>` metadata when a keys file is
configured (TASKMUX_API_KEYS_FILE). The file, JSON or TOML, maps tenants to the SHA-256 of
their key and, optionally, the heads they may call:

    {"tenants": {"acme": {"key_sha256": "<64 hex>", "heads": ["embed", "sentiment"],
                          "rate_per_s": 50, "burst": 100,
                          "quota_units": 1000000, "quota_window_s": 86400}}}

A tenant without `heads` may call every head; one without limits is unlimited (the
limits are explained in gateway/limits.py). Tenant names are 1-64 letters, digits, `.`,
`_` or `-`: they appear in Redis keys and logs. Keys are never stored or logged in clear;
`taskmux keys new` makes a key and its line for the file. Health and reflection stay open.

The file is re-read when it changes (`KeysFile`), without a restart: a call checks it at
most once per `RELOAD_CHECK_S`, so an added tenant's key works, and a removed one's is
refused, from the first call after that. A file that does not load (malformed, half
written, deleted) is reported in the log and the last good keys stay in force: a broken
keys file never turns authentication off.

`ApiKeys` is a layer of the handler stack (gateway/handlers.py), inside the metrics and
statuses layers: a refusal is raised here, answered there and counted like any other
status. It makes the caller's `Tenant` visible to the servicer through `caller()`, a
context variable scoped to the one call, which the servicer uses to charge limits and to
keep each tenant's idempotency keys apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import logging
import os
import re
import time
import tomllib
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskmux_api.kinds import task_of_request
from taskmux_api.v1 import taskmux_pb2 as pb

from gateway.errors import PermissionDenied, Unauthenticated, Undecodable
from gateway.handlers import Call
from gateway.limits import TenantLimits
from taskmux.config import SettingsError
from taskmux.logs import log_context

log = logging.getLogger(__name__)

AUTH_METADATA = "authorization"
BEARER = "bearer "
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Longest a changed keys file goes unnoticed; each check is one stat() of the file.
RELOAD_CHECK_S = 1.0


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """One keys-file entry."""

    name: str
    key_sha256: str
    heads: frozenset[str] | None  # None: every head
    limits: TenantLimits = field(default_factory=TenantLimits)

    def check_heads(self, heads: Iterable[str]) -> None:
        """Raise PermissionDenied for the first head this tenant may not use."""
        if self.heads is None:
            return
        for head in heads:
            if head not in self.heads:
                raise PermissionDenied(f"tenant {self.name!r} may not use head {head!r}")


class KeyRing:
    """The tenants of a keys file, looked up by key in constant time per entry."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._tenants = tuple(tenants)

    def __len__(self) -> int:
        return len(self._tenants)

    def names(self) -> set[str]:
        """The tenants' names."""
        return {t.name for t in self._tenants}

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Tenant:
        """The tenant whose key the call's metadata carries; Unauthenticated otherwise."""
        value = next((v for k, v in metadata or () if k == AUTH_METADATA), None)
        if value is None:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        if isinstance(value, bytes) or not value.lower().startswith(BEARER):
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
        digest = hash_key(value[len(BEARER) :].strip())
        found = None
        for tenant in self._tenants:  # no early exit: time does not tell which entry matched
            if hmac.compare_digest(digest, tenant.key_sha256):
                found = tenant
        if found is None:
            raise Unauthenticated("invalid API key")
        return found


def load_keys(path: Path) -> KeyRing:
    """Read a JSON or TOML keys file; SettingsError names what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise SettingsError(f"cannot read API keys file {path}: {err}") from None
    return parse_keys(path, text)


def parse_keys(path: Path, text: str) -> KeyRing:
    """The keys of `text`, the content of `path` (whose suffix tells TOML from JSON)."""
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as err:
        raise SettingsError(f"cannot read API keys file {path}: {err}") from None
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict) or not tenants:
        raise SettingsError(f"{path}: expected a non-empty 'tenants' table")
    ring = []
    for name, entry in tenants.items():
        digest = entry.get("key_sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or len(digest) != 64:
            raise SettingsError(f"{path}: tenant {name!r} needs key_sha256 (64 hex digits)")
        if not TENANT_NAME.fullmatch(name):
            raise SettingsError(
                f"{path}: tenant name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
        heads = entry.get("heads")
        if heads is not None and not (
            isinstance(heads, list) and all(isinstance(h, str) for h in heads)
        ):
            raise SettingsError(f"{path}: tenant {name!r}: heads must be a list of names")
        ring.append(
            Tenant(
                name,
                digest.lower(),
                None if heads is None else frozenset(heads),
                _limits(path, name, entry),
            )
        )
    return KeyRing(ring)


def _limits(path: Path, name: str, entry: dict[str, Any]) -> TenantLimits:
    """The tenant's rate and quota fields, each a non-negative number."""
    values: dict[str, Any] = {}
    for setting, kind in (
        ("rate_per_s", float),
        ("burst", int),
        ("quota_units", int),
        ("quota_window_s", int),
    ):
        value = entry.get(setting)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise SettingsError(f"{path}: tenant {name!r}: {setting} must be a number >= 0")
        if kind is int and value != int(value):
            raise SettingsError(f"{path}: tenant {name!r}: {setting} must be a whole number")
        values[setting] = kind(value)
    if values.get("quota_window_s") == 0:
        raise SettingsError(f"{path}: tenant {name!r}: quota_window_s must be at least 1")
    return TenantLimits(**values)


_caller: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar(
    "taskmux_caller", default=None
)


def caller() -> Tenant | None:
    """The tenant of the call being served; None when authentication is off."""
    return _caller.get()


def request_heads(request: object) -> list[str]:
    """The heads a TaskMux request would use (none for ListTasks or an unparsed request)."""
    if isinstance(request, pb.PipelineRequest):
        which = request.WhichOneof("task")
        return request_heads(getattr(request, which)) if which else []
    task = task_of_request(request)
    if task is None:
        return []
    named = getattr(request, task.head_field) if task.head_field else ""
    if isinstance(named, str):  # one head, or the task's default one
        return [named or task.default_head]
    return list(named)


class KeysFile:
    """A keys file's KeyRing, re-read when the file changes; the last good one otherwise."""

    def __init__(self, path: Path, *, check_interval_s: float = RELOAD_CHECK_S) -> None:
        """Load the file; SettingsError if it cannot be (at start, a bad file is fatal)."""
        self.path = path
        self._interval_s = check_interval_s
        try:
            self._signature: tuple[int, int, int, int] | None = self._stat()
            self._text = self._read_text()
        except (OSError, ValueError) as err:
            raise SettingsError(f"cannot read API keys file {path}: {err}") from None
        self._keys = parse_keys(path, self._text)
        self._next_check = time.monotonic() + check_interval_s

    def __len__(self) -> int:
        return len(self._keys)

    def current(self) -> KeyRing:
        """The keys in force, after re-reading the file if it changed since the last check."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._interval_s
            self._check()
        return self._keys

    def _check(self) -> None:
        signature: tuple[int, int, int, int] | None
        try:
            signature = self._stat()
        except OSError as err:
            signature = None
            if self._signature is not None:
                log.error("API keys file: %s; keeping the last good keys", err)
        if signature is None or signature == self._signature:
            self._signature = signature
            return
        self._signature = signature
        try:
            text = self._read_text()
        except (OSError, ValueError) as err:
            log.error("API keys file: %s; keeping the last good keys", err)
            return
        if text == self._text:
            return
        self._text = text
        try:
            keys = parse_keys(self.path, text)
        except SettingsError as err:
            log.error("API keys not reloaded, keeping the last good keys: %s", err)
            return
        old, new = self._keys.names(), keys.names()
        self._keys = keys
        log.info(
            "API keys: %d tenants reloaded from %s (added %s, removed %s)",
            len(keys),
            self.path,
            sorted(new - old) or "none",
            sorted(old - new) or "none",
        )

    def _stat(self) -> tuple[int, int, int, int]:
        st = os.stat(self.path)  # follows symlinks: the file a Secret volume points to now
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read_text(self) -> str:
        return self.path.read_text(encoding="utf-8")


class ApiKeys:
    """The handler-stack layer that authenticates every TaskMux call by its key and
    checks each of its requests' heads (a Pipeline's, one by one, as they arrive)."""

    def __init__(self, keys: KeysFile) -> None:
        self._keys = keys

    @contextlib.asynccontextmanager
    async def __call__(self, call: Call) -> AsyncIterator[None]:
        metadata: Any = call.context.invocation_metadata()
        tenant = self._keys.current().tenant(metadata)
        call.tenant = tenant.name  # for the outer layers, even if a head is refused next
        _check_heads(tenant, call.request)
        call.request_checks.append(lambda request: self._authorize(metadata, request))
        with _calling_as(tenant):
            yield

    def _authorize(self, metadata: Any, request: object) -> None:
        # The keys in force now: a Pipeline stream of a removed tenant stops too.
        _check_heads(self._keys.current().tenant(metadata), request)


def _check_heads(tenant: Tenant, request: object) -> None:
    if not isinstance(request, Undecodable):  # it has no heads to check
        tenant.check_heads(request_heads(request))


@contextlib.contextmanager
def _calling_as(tenant: Tenant) -> Iterator[None]:
    """Make `tenant` the caller, in `caller()` and in log lines, for the call's duration."""
    token = _caller.set(tenant)
    try:
        with log_context(tenant=tenant.name):
            yield
    finally:
        # An abandoned stream's generator may be closed from another context later;
        # that context never saw the value, so there is nothing to reset there.
        with contextlib.suppress(ValueError):
            _caller.reset(token)


def api_keys(keys_file: str) -> ApiKeys | None:
    """The API-key layer for this keys file; None, with a loud warning, when it is unset."""
    if not keys_file:
        log.warning(
            "NO AUTHENTICATION: TASKMUX_API_KEYS_FILE is unset, so any client can call every "
            "head. Set it (and TLS) before exposing this gateway beyond localhost."
        )
        return None
    keys = KeysFile(Path(keys_file))
    log.info("API keys: %d tenants loaded from %s (reloaded when it changes)", len(keys), keys_file)
    return ApiKeys(keys)
