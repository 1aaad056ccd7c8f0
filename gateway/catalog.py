"""What the deployment serves, and whether Redis is reachable: one watcher loop.

Every `monitor_interval_ms` the watcher reads the head catalogs of the live workers
(`router.registry`: two commands, whatever else Redis holds) and sets the gRPC health
status: SERVING while Redis answers, NOT_SERVING otherwise. The reply stream's TTL is
the reply router's own loop, so a slow round here never lets it lapse.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from model.manifest import HeadSpec, Manifest, ModelRepoError, PartFile
from router import keys, registry
from taskmux.health import Health
from taskmux.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

RECHECK_DOWN_S = 0.1


class CatalogWatcher:
    """Owns the monitor task; exposes the latest catalog and Redis reachability."""

    def __init__(
        self,
        redis: aioredis.Redis,
        health: Health,
        *,
        interval_ms: int,
    ) -> None:
        self.catalog: Manifest | None = None
        self.redis_ok = False
        # Times Redis came back after being lost (the first connection is not one).
        self.reconnects = 0
        self._ever_ok = False
        self._redis = redis
        self._health = health
        self._interval_s = interval_ms / 1000
        self._task: asyncio.Task[None] | None = None
        self._first_check = asyncio.Event()

    async def __aenter__(self) -> CatalogWatcher:
        await self._health.start()
        self._task = asyncio.create_task(self._loop(), name="catalog-watcher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)

    async def first_check(self) -> None:
        """Wait until the first check has run (success or not)."""
        await self._first_check.wait()

    async def check(self) -> None:
        """One round: catalog and health."""
        try:
            raws = await self._read_catalogs()
        except RedisError as err:
            if self.redis_ok:
                log.warning("Redis unreachable: %s", err)
            await self._set_health(False)
            return
        if not self.redis_ok:
            log.info("Redis reachable")
            self.reconnects += self._ever_ok
            self._ever_ok = True
        await self._set_health(True)
        catalogs = []
        for raw in raws:
            try:
                catalogs.append(Manifest.from_json(raw))
            except ModelRepoError as err:
                log.error("ignoring an unreadable catalog in Redis: %s", err)
        if not catalogs:
            return
        catalog = merge_catalogs(catalogs)
        if self.catalog is None or catalog != self.catalog:
            log.info("catalog: heads %s", [h.name for h in catalog.heads])
        self.catalog = catalog

    async def _read_catalogs(self) -> list[bytes]:
        """Live workers' catalogs, or the last one any worker left when none is alive."""
        raws = await registry.live_catalogs(self._redis)
        if raws:
            return raws
        fallback = await self._redis.get(keys.CATALOG_KEY)
        if not fallback:
            return []
        return [fallback if isinstance(fallback, bytes) else fallback.encode()]

    async def _loop(self) -> None:
        while True:
            await self.check()
            self._first_check.set()
            # While Redis is lost, look again soon: calls are refused until it is seen back.
            await asyncio.sleep(self._interval_s if self.redis_ok else RECHECK_DOWN_S)

    async def _set_health(self, ok: bool) -> None:
        self.redis_ok = ok
        await self._health.set_ready(ok)


def merge_catalogs(catalogs: list[Manifest]) -> Manifest:
    """Every head any live worker serves; for a head on several versions, the newest. The
    encoder lists every head's own branch that some worker serves (for its cost)."""
    heads: dict[str, HeadSpec] = {}
    branches: dict[str, dict[str, PartFile]] = {}
    for catalog in catalogs:
        branches |= {n: catalog.encoder.branch_files(n) for n in catalog.encoder.user_branches()}
        for head in catalog.heads:
            seen = heads.get(head.name)
            if seen is None or _version_key(head.version) > _version_key(seen.version):
                heads[head.name] = head
    encoder = catalogs[0].encoder
    if branches and encoder.parts:
        encoder = encoder.with_branches(branches)
    return Manifest(encoder=encoder, heads=tuple(heads.values()))


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
