"""The worker's side of the task streams: read jobs, write replies, acknowledge.

All Redis I/O of a worker goes through `JobStreams`; the rest of the worker sees
`Pulled` entries and `Reply` objects, never redis-py types.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from router import keys
from router.messages import Fields, Job, MalformedMessage, Reply, reply_address, stream_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pulled:
    """One entry read from a job stream, decoded or not."""

    stream: str
    entry_id: bytes
    job: Job | None
    problem: str = ""
    raw: Fields | None = None


class JobStreams:
    """Consumer-group access to the job streams of the heads a worker serves."""

    def __init__(
        self,
        redis: aioredis.Redis,
        heads: Sequence[str],
        consumer: str,
        *,
        read_count: int,
        block_ms: int,
    ) -> None:
        self._redis = redis
        self._streams = [keys.task_stream(h) for h in heads]
        self._consumer = consumer
        self._read_count = read_count
        self._block_ms = block_ms

    async def set_heads(self, heads: Sequence[str]) -> None:
        """Serve these heads from now on (after a hot reload)."""
        self._streams = [keys.task_stream(h) for h in heads]
        await self.ensure_groups()

    async def ensure_groups(self) -> None:
        """Create the consumer group on every stream (from the start, so queued work counts)."""
        for stream in self._streams:
            try:
                await self._redis.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    async def read(self) -> list[Pulled]:
        """New entries from all streams in one XREADGROUP; empty after `block_ms` idle."""
        try:
            response = await self._redis.xreadgroup(
                keys.WORKER_GROUP,
                self._consumer,
                dict.fromkeys(self._streams, ">"),
                count=self._read_count,
                block=self._block_ms,
            )
        except ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            # Redis lost the groups (restarted without persistence): recreate them.
            log.warning("consumer group missing; recreating it")
            await self.ensure_groups()
            return []
        return [
            _decode(stream.decode(), entry_id, fields)
            for stream, entries in stream_entries(response)
            for entry_id, fields in entries
        ]

    async def reclaim(self, min_idle_ms: int, count: int) -> list[tuple[Pulled, int]]:
        """Entries other consumers left pending past `min_idle_ms`, now ours, each with
        its delivery count (XAUTOCLAIM, then XPENDING for the counts)."""
        claimed: list[tuple[Pulled, int]] = []
        for stream in self._streams:
            response = await self._redis.xautoclaim(
                stream, keys.WORKER_GROUP, self._consumer, min_idle_ms, "0-0", count=count
            )
            entries = [(i, f) for i, f in response[1] if f]
            if not entries:
                continue
            pending = await self._redis.xpending_range(
                stream,
                keys.WORKER_GROUP,
                min=entries[0][0],
                max=entries[-1][0],
                count=len(entries) * 2,
                consumername=self._consumer,
            )
            deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
            for entry_id, fields in entries:
                claimed.append((_decode(stream, entry_id, fields), deliveries.get(entry_id, 1)))
        return claimed

    async def touch(self, held: dict[str, set[bytes]]) -> None:
        """Reset the idle time of entries still being worked on, so none is reclaimed
        from under us (XCLAIM ... JUSTID does not count as a delivery)."""
        pipe = self._redis.pipeline(transaction=False)
        for stream, ids in held.items():
            if ids:
                pipe.xclaim(stream, keys.WORKER_GROUP, self._consumer, 0, list(ids), justid=True)
        await pipe.execute()

    async def add_counters(self, counters: dict[str, int]) -> None:
        """Add to this worker's counters hash (`keys.worker_stats`)."""
        stats = keys.worker_stats(self._consumer)
        pipe = self._redis.pipeline(transaction=False)
        for name, value in counters.items():
            pipe.hincrby(stats, name, value)
        pipe.expire(stats, keys.WORKER_STATS_TTL_S)
        await pipe.execute()

    async def finish(self, done: Sequence[tuple[Pulled, Reply | None]]) -> None:
        """Write each reply, then acknowledge and delete its entry, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for pulled, reply in done:
            if reply is not None and pulled.job is not None:
                pipe.xadd(
                    pulled.job.reply_to,
                    reply.encode(),  # type: ignore[arg-type]
                    maxlen=keys.REPLY_STREAM_MAXLEN,
                    approximate=True,
                    nomkstream=True,
                )
        for pulled, _ in done:
            pipe.xack(pulled.stream, keys.WORKER_GROUP, pulled.entry_id)
            pipe.xdel(pulled.stream, pulled.entry_id)
        await pipe.execute()

    async def dead_letter(self, pulled: Pulled, reply: Reply | None) -> None:
        """Move an undecodable entry to the dead-letter stream, answering its caller if known."""
        raw = pulled.raw or {}
        record: dict[bytes | str, bytes | str] = {
            "stream": pulled.stream,
            "entry_id": pulled.entry_id,
            "reason": pulled.problem,
        }
        record.update({b"field:" + k: v for k, v in raw.items()})
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(
            keys.DEAD_LETTER_STREAM,
            record,  # type: ignore[arg-type]
            maxlen=keys.DEAD_LETTER_MAXLEN,
            approximate=True,
        )
        address = reply_address(raw)
        if reply is not None and address is not None:
            pipe.xadd(address[1], reply.encode(), nomkstream=True)  # type: ignore[arg-type]
        pipe.xack(pulled.stream, keys.WORKER_GROUP, pulled.entry_id)
        pipe.xdel(pulled.stream, pulled.entry_id)
        await pipe.execute()


def _decode(stream: str, entry_id: bytes, fields: Fields) -> Pulled:
    try:
        job = Job.decode(fields)
    except MalformedMessage as err:
        return Pulled(stream, entry_id, None, problem=str(err), raw=fields)
    if job.head != keys.head_of_stream(stream):
        problem = f"job for head {job.head!r} found in stream {stream!r}"
        return Pulled(stream, entry_id, None, problem=problem, raw=fields)
    return Pulled(stream, entry_id, job, raw=fields)
