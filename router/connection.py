"""Opening Redis connections: explicit timeouts, ACL credentials and TLS.

redis-py 8 defaults to a 5 s socket timeout with automatic retries, which silently
re-issues a blocking XREADGROUP whose BLOCK is longer than the timeout. Every client here
states its timeouts instead: the socket timeout is always above the longest BLOCK the
caller uses, and a connection attempt fails fast so callers can answer UNAVAILABLE.

Each process keeps at most `max_connections` connections (`TASKMUX_REDIS_MAX_CONNECTIONS`).
A command that finds them all busy waits for one to be released, however many calls are
in flight: redis-py's default pool raises `MaxConnectionsError` instead, which a caller
cannot tell from a Redis that is down. Waiters are served in arrival order
(`FairConnectionPool`, a fair `asyncio.Semaphore` in front of the pool): redis-py's
`BlockingConnectionPool` wakes waiters through an `asyncio.Condition`, where a newcomer
can take the released connection first and, on Python 3.11, a cancelled waiter swallows
its wake-up, so one call could wait forever under load (seen: 2 of 5,592 calls stuck
until their 120 s client deadline). The wait has no timeout of its own: it is bounded by
the commands ahead of it, each bounded by the socket timeout, and a gRPC call's wait ends
with the call's deadline, which cancels it.

Credentials come from the URL (`redis://user:password@host`) or from
`TASKMUX_REDIS_USERNAME` and `TASKMUX_REDIS_PASSWORD` / `TASKMUX_REDIS_PASSWORD_FILE`;
`RedisSettings` takes them out of the URL, so the URL it keeps is safe to print and the
password is a `Secret` that prints as `***`. A `rediss://` URL connects with TLS and
verifies the server's certificate and host name. The ACL users for a gateway and a
worker are in `router.acl`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from taskmux.config import Secret, SettingsError, env_int, env_secret, env_str, redact_url

CONNECT_TIMEOUT_S = 1.0
# Set while this task is inside FairConnectionPool.get_connection.
_ACQUIRING: ContextVar[bool] = ContextVar("acquiring_redis_connection", default=False)
SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisSettings:
    """Where Redis is and how to authenticate to it; the same for gateways and workers."""

    # redis:// (plaintext), rediss:// (TLS) or unix:// URL of the Redis holding the
    # task streams; point all gateways and workers at the same one.
    url: str = "redis://127.0.0.1:6379/0"
    # ACL user (Redis 6+), e.g. taskmux-gateway or taskmux-worker (router/acl.py);
    # "" is Redis's `default` user.
    username: str = ""
    # The user's password (TASKMUX_REDIS_PASSWORD, TASKMUX_REDIS_PASSWORD_FILE or the URL).
    password: Secret = field(default_factory=Secret)
    # PEM CA bundle that signed the server's certificate; "" trusts the system's CAs.
    tls_ca_file: str = ""
    # PEM client certificate and its key, for servers that require mutual TLS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Most connections this process opens; commands beyond them wait for a free one.
    # Raise it if Redis round trips are slow (a distant Redis) and calls queue for one.
    max_connections: int = 64

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RedisSettings:
        """Settings from `TASKMUX_REDIS_*`; credentials in the URL move out of it."""
        raw_url = env_str(env, "REDIS_URL", cls.url)
        url, url_user, url_password = _split_credentials(raw_url)
        username = env_str(env, "REDIS_USERNAME", "")
        if username and url_user:
            raise SettingsError("set the Redis user in TASKMUX_REDIS_URL or TASKMUX_REDIS_USERNAME")
        password = env_secret(env, "REDIS_PASSWORD")
        if password and url_password:
            raise SettingsError(
                "TASKMUX_REDIS_URL holds a password; do not also set TASKMUX_REDIS_PASSWORD(_FILE)"
            )
        settings = cls(
            url=url,
            username=username or url_user,
            password=password or url_password,
            tls_ca_file=env_str(env, "REDIS_TLS_CA_FILE", ""),
            tls_cert_file=env_str(env, "REDIS_TLS_CERT_FILE", ""),
            tls_key_file=env_str(env, "REDIS_TLS_KEY_FILE", ""),
            max_connections=env_int(env, "REDIS_MAX_CONNECTIONS", cls.max_connections, minimum=2),
        )
        settings._check_tls()
        return settings

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss://")

    def describe(self) -> str:
        """For the start-up log line: no secret in it."""
        user = self.username or "default"
        auth = "password" if self.password else "none"
        tls = ("mtls" if self.tls_cert_file else "tls") if self.tls else "off"
        return f"{self.url} user={user} auth={auth} tls={tls}"

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `Redis.from_url(self.url, ...)` (sync or asyncio)."""
        options: dict[str, Any] = {}
        if self.username:
            options["username"] = self.username
        if self.password:
            options["password"] = self.password.reveal()
        if self.tls:
            options.update(
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
                ssl_ca_certs=self.tls_ca_file or None,
                ssl_certfile=self.tls_cert_file or None,
                ssl_keyfile=self.tls_key_file or None,
            )
        return options

    def _check_tls(self) -> None:
        files = {
            "TASKMUX_REDIS_TLS_CA_FILE": self.tls_ca_file,
            "TASKMUX_REDIS_TLS_CERT_FILE": self.tls_cert_file,
            "TASKMUX_REDIS_TLS_KEY_FILE": self.tls_key_file,
        }
        for name, path in files.items():
            if path and not self.tls:
                raise SettingsError(f"{name} needs a rediss:// TASKMUX_REDIS_URL")
            if path and not Path(path).is_file():
                raise SettingsError(f"{name}={path} is not a file")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError(
                "set both TASKMUX_REDIS_TLS_CERT_FILE and TASKMUX_REDIS_TLS_KEY_FILE, or neither"
            )


def _split_credentials(url: str) -> tuple[str, str, Secret]:
    """(url without user and password, user, password) of a Redis URL."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise SettingsError(
            f"TASKMUX_REDIS_URL={redact_url(url)} must start with redis://, rediss:// or unix://"
        )
    if parts.username is None and parts.password is None:
        return url, "", Secret()
    host = parts.netloc.rpartition("@")[2]
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, unquote(parts.username or ""), Secret(unquote(parts.password or ""))


class FairConnectionPool(aioredis.ConnectionPool):
    """A connection pool whose callers wait, first come first served, while all
    `max_connections` are busy (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slots = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self._slots.acquire()
        token = _ACQUIRING.set(True)
        try:
            # redis-py leaves this method unannotated.
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            self._slots.release()
            raise
        finally:
            _ACQUIRING.reset(token)

    async def release(self, connection: Any) -> None:
        # Only a connection handed out holds a slot; one that failed while being handed
        # out (redis-py releases it inside get_connection) gives its slot back there.
        holds_slot = connection in self._in_use_connections and not _ACQUIRING.get()
        try:
            await super().release(connection)
        finally:
            if holds_slot:
                self._slots.release()


def connect(
    settings: RedisSettings, *, block_ms: int = 0, command_timeout_s: float = 2.0
) -> aioredis.Redis:
    """A Redis client whose socket timeout exceeds `block_ms` by `command_timeout_s`, and
    whose commands wait for a free connection when all `max_connections` are busy."""
    pool = FairConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        decode_responses=False,
        protocol=2,  # router.messages parses RESP2 stream replies
        socket_timeout=block_ms / 1000 + command_timeout_s,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        # One quick retry covers a connection dropped while idle; more would only
        # delay the UNAVAILABLE a caller should see while Redis is down.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        health_check_interval=30,
        # No CLIENT SETINFO on connect: one command fewer for the ACL users (router/acl.py)
        # to be granted, and Redis 7.0 refuses it in an ACL rule.
        driver_info=None,
        **settings.client_options(),
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool
