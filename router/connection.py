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

With `TASKMUX_REDIS_SENTINELS` (`host:port,host:port,...`) instead of a URL, clients ask
those Valkey/Redis Sentinels where the primary of `TASKMUX_REDIS_MASTER_NAME` is, with the
same user, password and TLS options (`TASKMUX_REDIS_TLS=true` for TLS, to the sentinels
and the primary alike; the sentinels may have a password of their own,
`TASKMUX_REDIS_SENTINEL_PASSWORD(_FILE)`). After a failover a command on the old primary
fails with a connection error, or READONLY if the old primary came back as a replica:
redis-py's sentinel connection turns READONLY into a disconnect, and every reconnect
(the client's one retry, or the caller's next command) asks the sentinels again, so the
first command after the promotion finds the new primary. While no primary is known the
command fails as Redis being down does (`MasterNotFoundError`, a `ConnectionError`), and
callers answer UNAVAILABLE. The pool waits for free connections the same fair way
(`FairSentinelConnectionPool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from taskmux.config import (
    Secret,
    SettingsError,
    env_int,
    env_list,
    env_secret,
    env_str,
    redact_url,
)

CONNECT_TIMEOUT_S = 1.0

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_URL = "redis://127.0.0.1:6379/0"
# A sentinel answers from memory: a second is long, and a dead one is skipped for the next.
SENTINEL_TIMEOUT_S = 1.0
# How often a sentinel pool asks whether the primary has moved (FairSentinelConnectionPool).
MASTER_CHECK_INTERVAL_S = 1.0
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class RedisSettings:
    """Where Redis is and how to authenticate to it; the same for gateways and workers."""

    # redis:// (plaintext), rediss:// (TLS) or unix:// URL of the Redis holding the
    # task streams; point all gateways and workers at the same one.
    # Unused, and must not be set, with `sentinels`.
    url: str = DEFAULT_URL
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
    # Sentinels (host, port) to ask for the primary instead of `url`: set them when
    # Redis runs as a primary with replicas under Sentinel, so clients follow a failover.
    sentinels: tuple[tuple[str, int], ...] = ()
    # The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    master_name: str = "taskmux"
    # The sentinels' own ACL user and password (`requirepass`/`user` in sentinel.conf),
    # if they have one; "" connects to them without AUTH.
    sentinel_username: str = ""
    sentinel_password: Secret = field(default_factory=Secret)
    # TLS with sentinels (with a URL its rediss:// scheme says so): to the sentinels and
    # to the primary, with the tls_* files above.
    sentinel_tls: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RedisSettings:
        """Settings from `TASKMUX_REDIS_*`; credentials in the URL move out of it."""
        sentinels = _parse_sentinels(env_list(env, "REDIS_SENTINELS", ()))
        # With sentinels a URL may still give the user, password and TLS (rediss://); its
        # host comes from the sentinels instead, and only database 0 is served.
        if sentinels and urlsplit(env_str(env, "REDIS_URL", "")).path not in ("", "/", "/0"):
            raise SettingsError(
                "with TASKMUX_REDIS_SENTINELS, TASKMUX_REDIS_URL must name database 0 or none"
            )
        tls = _env_bool(env, "REDIS_TLS")
        if tls is not None and not sentinels:
            raise SettingsError(
                "TASKMUX_REDIS_TLS is for TASKMUX_REDIS_SENTINELS; with TASKMUX_REDIS_URL, "
                "use a rediss:// URL for TLS"
            )
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
            sentinels=sentinels,
            master_name=env_str(env, "REDIS_MASTER_NAME", cls.master_name),
            sentinel_username=env_str(env, "REDIS_SENTINEL_USERNAME", ""),
            sentinel_password=env_secret(env, "REDIS_SENTINEL_PASSWORD"),
            sentinel_tls=bool(tls),
        )
        if not sentinels and (settings.sentinel_username or settings.sentinel_password):
            raise SettingsError(
                "TASKMUX_REDIS_SENTINEL_USERNAME and _PASSWORD need TASKMUX_REDIS_SENTINELS"
            )
        settings._check_tls()
        return settings

    @property
    def tls(self) -> bool:
        return self.sentinel_tls or self.url.startswith("rediss://")

    @property
    def where(self) -> str:
        """The URL, or `sentinel://host:port,.../<master name>`; no secret in it."""
        if not self.sentinels:
            return self.url
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"sentinel://{hosts}/{self.master_name}"

    def describe(self) -> str:
        """For the start-up log line: no secret in it."""
        user = self.username or "default"
        auth = "password" if self.password else "none"
        tls = ("mtls" if self.tls_cert_file else "tls") if self.tls else "off"
        return f"{self.where} user={user} auth={auth} tls={tls}"

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `Redis.from_url(self.url, ...)` (sync or asyncio)."""
        options: dict[str, Any] = {}
        if self.username:
            options["username"] = self.username
        if self.password:
            options["password"] = self.password.reveal()
        return options | self.tls_options()

    def sentinel_options(self) -> dict[str, Any]:
        """Keyword arguments for the connections to the sentinels themselves."""
        options: dict[str, Any] = {}
        if self.sentinel_username:
            options["username"] = self.sentinel_username
        if self.sentinel_password:
            options["password"] = self.sentinel_password.reveal()
        if self.tls:  # no rediss:// scheme picks the TLS connection class here
            options["ssl"] = True
        return options | self.tls_options()

    def tls_options(self) -> dict[str, Any]:
        """TLS keyword arguments, none without TLS."""
        options: dict[str, Any] = {}
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
                raise SettingsError(
                    f"{name} needs a rediss:// TASKMUX_REDIS_URL "
                    "(or TASKMUX_REDIS_TLS=true with TASKMUX_REDIS_SENTINELS)"
                )
            if path and not Path(path).is_file():
                raise SettingsError(f"{name}={path} is not a file")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError(
                "set both TASKMUX_REDIS_TLS_CERT_FILE and TASKMUX_REDIS_TLS_KEY_FILE, or neither"
            )


def _parse_sentinels(items: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """(host, port) pairs from `host:port` items ([v6]:port for IPv6)."""
    sentinels = []
    for item in items:
        host, _, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(
                f"TASKMUX_REDIS_SENTINELS: {item!r} is not host:port (e.g. 10.0.0.5:26379)"
            )
        sentinels.append((host, int(port)))
    return tuple(sentinels)


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    """`TASKMUX_<name>` as true/false, or None when unset."""
    raw = env_str(env, name, "").lower()
    if not raw:
        return None
    if raw not in TRUE + FALSE:
        raise SettingsError(f"TASKMUX_{name}={raw!r} must be true or false")
    return raw in TRUE


def _split_credentials(url: str) -> tuple[str, str, Secret]:
    """(url without user and password, user, password) of a Redis URL."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise SettingsError(
            f"TASKMUX_REDIS_URL={redact_url(url)} must start with redis://, rediss:// or unix://"
        )
    # A scheme has no case (RFC 3986), but redis-py only knows it in lower case. Only the
    # text before the first ":" is touched: urlsplit drops stray control characters, so
    # its scheme's length need not match the URL's.
    scheme, colon, rest = url.partition(":")
    url = scheme.lower() + colon + rest
    if parts.username is None and parts.password is None:
        return url, "", Secret()
    host = parts.netloc.rpartition("@")[2]
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, unquote(parts.username or ""), Secret(unquote(parts.password or ""))


class _FairSlots:
    """Makes a connection pool's callers wait, first come first served, while all
    `max_connections` are busy (see the module docstring). Mixed in before the pool."""

    max_connections: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(self.max_connections)
        # The connections handed out, each holding one slot until it is released.
        self._holding: set[Any] = set()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self._slots.acquire()
        try:
            # redis-py leaves this method unannotated.
            connection = await super().get_connection(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            # redis-py releases a connection that fails here itself; it held no slot yet.
            self._slots.release()
            raise
        self._holding.add(connection)
        return connection

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)  # type: ignore[misc]
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._slots.release()


class FairConnectionPool(_FairSlots, aioredis.ConnectionPool):
    """A connection pool to one Redis URL whose callers wait in arrival order."""


class FairSentinelConnectionPool(_FairSlots, SentinelConnectionPool):
    """A pool of connections to the primary the sentinels name, whose callers wait in
    arrival order; closing it also closes the connections to the sentinels.

    redis-py asks the sentinels only when a connection (re)connects, so a connection to
    a primary that was demoted while alive (a graceful failover, or a partition) would
    keep writing to it until it refuses a write. Here, at most once every
    `MASTER_CHECK_INTERVAL_S`, taking a connection first asks the sentinels; once the
    primary has moved, idle connections are closed (redis-py does that) and busy ones
    as they come back, so every command after that goes to the new primary.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checked_at = -MASTER_CHECK_INTERVAL_S

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_INTERVAL_S:
            self._checked_at = now  # first, so that one caller asks, not every one
            # Sentinels out of reach change nothing: the connections keep their primary.
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        return await super().get_connection(*args, **kwargs)

    async def release(self, connection: Any) -> None:
        if self.master_address not in (None, (connection.host, connection.port)):
            await connection.disconnect()  # it reconnects to the new primary when reused
        await super().release(connection)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def connect(
    settings: RedisSettings, *, block_ms: int = 0, command_timeout_s: float = 2.0
) -> aioredis.Redis:
    """A Redis client whose socket timeout exceeds `block_ms` by `command_timeout_s`, and
    whose commands wait for a free connection when all `max_connections` are busy; with
    sentinels, one that follows the primary through a failover."""
    options: dict[str, Any] = dict(
        max_connections=settings.max_connections,
        decode_responses=False,
        protocol=2,  # router.messages parses RESP2 stream replies
        socket_timeout=block_ms / 1000 + command_timeout_s,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        # One quick retry covers a connection dropped while idle (and, with sentinels, a
        # primary that has just been replaced: the retry reconnects to the new one); more
        # would only delay the UNAVAILABLE a caller should see while Redis is down.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        health_check_interval=30,
        # No CLIENT SETINFO on connect: one command fewer for the ACL users (router/acl.py)
        # to be granted, and Redis 7.0 refuses it in an ACL rule.
        driver_info=None,
        **settings.client_options(),
    )
    if urlsplit(settings.url).scheme != "unix":  # a Unix socket has no TCP keepalive
        options["socket_keepalive"] = True
    if settings.sentinels:
        return _primary_via_sentinels(settings, options)
    pool = FairConnectionPool.from_url(settings.url, **options)
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


def _primary_via_sentinels(settings: RedisSettings, options: dict[str, Any]) -> aioredis.Redis:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        settings.sentinels,
        sentinel_kwargs=dict(
            socket_timeout=SENTINEL_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            driver_info=None,
            **settings.sentinel_options(),
        ),
    )
    if settings.tls:
        options["ssl"] = True  # SentinelConnectionPool's switch to TLS connections
    client: aioredis.Redis = sentinel.master_for(
        settings.master_name, connection_pool_class=FairSentinelConnectionPool, **options
    )
    return client  # closing the client closes the pool, and the pool the sentinels
