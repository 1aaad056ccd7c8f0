"""The memory guard: refuse new calls while Redis is near its memory limit.

Redis runs with `maxmemory-policy noeviction` (evicting would drop queued jobs), so at
`maxmemory` it refuses every write and every call would fail. One loop reads `INFO
memory` every `monitor_interval_ms`; while `used_memory` is at or above the high-water
fraction of `maxmemory`, `check` raises RESOURCE_EXHAUSTED with a retry hint, before the
call claims a key, is charged or queues anything. Calls already queued go on, and their
replies, acknowledgements and expiring records free memory; below the mark calls are
accepted again. Without a `maxmemory`, with the guard off (high water 0), or while INFO
cannot be read, nothing is refused here: reachability is the catalog watcher's concern,
and a write Redis refuses for memory still becomes RESOURCE_EXHAUSTED (`errors.from_redis`).
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

from gateway.errors import REDIS_MEMORY_RETRY_AFTER_MS, ResourceExhausted
from taskmux.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)


class MemoryGuard:
    """Owns the loop that reads Redis's memory use; `check` refuses calls above the mark."""

    def __init__(self, redis: aioredis.Redis, *, high_water: float, interval_ms: int) -> None:
        self._redis = redis
        self._high_water = high_water
        self._interval_s = interval_ms / 1000
        self._task: asyncio.Task[None] | None = None
        # (used_memory, maxmemory) while above the mark, else None.
        self._over: tuple[int, int] | None = None

    async def __aenter__(self) -> MemoryGuard:
        if self._high_water > 0:
            self._task = asyncio.create_task(self._loop(), name="memory-guard")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)

    def check(self) -> None:
        """Raise ResourceExhausted while Redis is above the high-water mark."""
        if self._over is None:
            return
        used, limit = self._over
        raise ResourceExhausted(
            f"Redis is near its memory limit ({used / 2**20:.1f} of {limit / 2**20:.1f} MiB "
            f"used, refusing new calls from {self._high_water:.0%}); retry after "
            f"{REDIS_MEMORY_RETRY_AFTER_MS} ms",
            retry_after_ms=REDIS_MEMORY_RETRY_AFTER_MS,
        )

    async def read(self) -> bool:
        """Read INFO memory once and update the state; False if INFO is not allowed."""
        try:
            info = await self._redis.info("memory")
        except NoPermissionError:
            self._set(None)
            return False
        except RedisError:
            self._set(None)  # unreachable: the watcher reports it, calls fail on their own
            return True
        used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        self._set((used, limit) if limit > 0 and used >= self._high_water * limit else None)
        return True

    def _set(self, over: tuple[int, int] | None) -> None:
        if over is not None and self._over is None:
            log.warning(
                "Redis memory at %d of %d bytes (high water %.0f%%): refusing new calls",
                *over,
                self._high_water * 100,
            )
        elif over is None and self._over is not None:
            log.info("Redis memory below the high-water mark again: accepting calls")
        self._over = over

    async def _loop(self) -> None:
        while True:
            if not await self.read():
                break
            await asyncio.sleep(self._interval_s)
        log.warning(
            "the memory guard is off: this Redis user may not run INFO (grant it +info, "
            "as router/acl.py should); Redis refusing writes at maxmemory still answers "
            "RESOURCE_EXHAUSTED"
        )
