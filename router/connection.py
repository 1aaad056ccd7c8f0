"""Opening Redis connections with explicit timeouts.

redis-py 8 defaults to a 5 s socket timeout with automatic retries, which silently
re-issues a blocking XREADGROUP whose BLOCK is longer than the timeout. Every client here
states its timeouts instead: the socket timeout is always above the longest BLOCK the
caller uses, and a connection attempt fails fast so callers can answer UNAVAILABLE.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

CONNECT_TIMEOUT_S = 1.0


def connect(url: str, *, block_ms: int = 0, command_timeout_s: float = 2.0) -> aioredis.Redis:
    """A Redis client for `url` whose socket timeout exceeds `block_ms` by `command_timeout_s`."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        protocol=2,  # router.messages parses RESP2 stream replies
        socket_timeout=block_ms / 1000 + command_timeout_s,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        # One quick retry covers a connection dropped while idle; more would only
        # delay the UNAVAILABLE a caller should see while Redis is down.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        health_check_interval=30,
    )
