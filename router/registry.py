"""The registry of live workers: who is alive and what each one serves.

A worker publishes its catalog under its own key with a TTL (the heartbeat) and adds its
id to the set `keys.WORKERS_KEY`; on exit it removes both. A gateway reads the set and
the catalog keys it names (SMEMBERS, then one MGET), and removes the ids whose key has
expired: workers that died without removing themselves. So finding the live workers
costs two commands per round, however many other keys Redis holds (a SCAN of the
keyspace would grow with them).

A worker whose key expired while it was alive (it could not reach Redis for three
refreshes) may be removed by a gateway just after it published again; its next refresh
adds it back.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from router import keys


async def publish(redis: aioredis.Redis, worker_id: str, catalog: str, ttl_s: int) -> None:
    """Publish a worker's catalog for `ttl_s` seconds and register it (worker side)."""
    pipe = redis.pipeline(transaction=False)
    # The key first: a gateway that sees the id in the set then finds its catalog.
    pipe.set(keys.worker_catalog(worker_id), catalog, ex=ttl_s)
    pipe.sadd(keys.WORKERS_KEY, worker_id)
    pipe.set(keys.CATALOG_KEY, catalog)
    await pipe.execute()


async def withdraw(redis: aioredis.Redis, worker_id: str) -> None:
    """Remove a stopping worker's catalog and its id (worker side)."""
    pipe = redis.pipeline(transaction=False)
    pipe.delete(keys.worker_catalog(worker_id))
    pipe.srem(keys.WORKERS_KEY, worker_id)
    await pipe.execute()


async def live_catalogs(redis: aioredis.Redis) -> list[bytes]:
    """The catalogs of the registered workers whose key is alive (gateway side); the ids
    of the others leave the registry."""
    members = await redis.smembers(keys.WORKERS_KEY)
    ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    if not ids:
        return []
    raws = await redis.mget([keys.worker_catalog(i) for i in ids])
    dead = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
    if dead:
        await redis.srem(keys.WORKERS_KEY, *dead)
    return [r if isinstance(r, bytes) else str(r).encode() for r in raws if r]
