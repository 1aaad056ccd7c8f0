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
from router.messages import (
    Fields,
    Job,
    MalformedMessage,
    Reply,
    UnreadablePayload,
    reply_address,
    stream_entries,
)
from router.payload import PayloadCipher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pulled:
    """One entry read from a job stream, decoded or not."""

    stream: str
    entry_id: bytes
    job: Job | None
    problem: str = ""
    raw: Fields | None = None
    # Its payload is sealed and cannot be opened here (no key, unknown key id, tampered):
    # a deployment problem the caller is told about in so many words.
    unreadable: bool = False


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
        cipher: PayloadCipher | None = None,
    ) -> None:
        self._redis = redis
        self._cipher = cipher  # opens jobs and seals replies; None: plaintext
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

    async def read(self, count: int) -> list[Pulled]:
        """Up to `count` new entries from each stream in one XREADGROUP; empty after
        `block_ms` idle."""
        try:
            response = await self._redis.xreadgroup(
                keys.WORKER_GROUP,
                self._consumer,
                dict.fromkeys(self._streams, ">"),
                count=min(count, self._read_count),
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
            _decode(stream.decode(), entry_id, fields, self._cipher)
            for stream, entries in stream_entries(response)
            for entry_id, fields in entries
        ]

    async def reclaim(self, min_idle_ms: int, limit: int) -> tuple[list[tuple[Pulled, int]], bool]:
        """Up to `limit` entries other consumers left pending past `min_idle_ms`, now ours,
        each with its delivery count; and whether more may be left to take.

        XAUTOCLAIM walks each stream's pending list with a cursor, so however many entries
        a dead worker held, repeated calls take them all over; XPENDING gives the counts.
        """
        claimed: list[tuple[Pulled, int]] = []
        for stream in self._streams:
            cursor: bytes | str = "0-0"
            while len(claimed) < limit:
                count = min(self._read_count, limit - len(claimed))
                response = await self._redis.xautoclaim(
                    stream, keys.WORKER_GROUP, self._consumer, min_idle_ms, cursor, count=count
                )
                cursor = response[0]
                claimed += await self._with_deliveries(stream, response[1])
                if cursor in (b"0-0", "0-0"):
                    break
            if len(claimed) >= limit:
                return claimed, True
        return claimed, False

    async def _with_deliveries(
        self, stream: str, response: list[tuple[bytes, Fields]]
    ) -> list[tuple[Pulled, int]]:
        # Entries deleted while pending come back without fields: nothing to do for them.
        entries = [(i, f) for i, f in response if f]
        if not entries:
            return []
        pending = await self._redis.xpending_range(
            stream,
            keys.WORKER_GROUP,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) * 2,
            consumername=self._consumer,
        )
        deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        return [(_decode(stream, i, f, self._cipher), deliveries.get(i, 1)) for i, f in entries]

    async def touch(self, held: dict[str, list[bytes]]) -> None:
        """Reset the idle time of entries still being worked on, so none is reclaimed
        from under us (XCLAIM ... JUSTID does not count as a delivery)."""
        pipe = self._redis.pipeline(transaction=False)
        for stream, ids in held.items():
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

    async def finish(self, done: Sequence[Finished]) -> None:
        """Write each reply (and dead letter), then acknowledge and delete each entry, as
        one transaction: if Redis refuses any write (e.g. out of memory under
        `noeviction`), nothing is acknowledged and the entries stay pending with us."""
        pipe = self._redis.pipeline(transaction=True)
        for f in done:
            if f.problem:
                pipe.xadd(
                    keys.DEAD_LETTER_STREAM,
                    _dead_letter_record(f),  # type: ignore[arg-type]
                    maxlen=keys.DEAD_LETTER_MAXLEN,
                    approximate=True,
                )
            address = f.reply_stream()
            if f.reply is not None and address is not None:
                pipe.xadd(
                    address,
                    f.reply.encode(self._cipher, address),  # type: ignore[arg-type]
                    maxlen=keys.REPLY_STREAM_MAXLEN,
                    approximate=True,
                    nomkstream=True,
                )
        _acknowledge(pipe, [f.pulled for f in done])
        await pipe.execute()

    async def acknowledge(self, pulled: Sequence[Pulled]) -> None:
        """Acknowledge and delete entries without a reply (their callers have gone).
        XACK and XDEL free memory, so Redis accepts them even when it is full."""
        pipe = self._redis.pipeline(transaction=True)
        _acknowledge(pipe, pulled)
        await pipe.execute()


def _acknowledge(pipe: aioredis.client.Pipeline, pulled: Sequence[Pulled]) -> None:
    """One XACK and one XDEL per stream for all of `pulled`, not one of each per entry:
    the same effect inside the transaction, for a fraction of the commands."""
    by_stream: dict[str, list[bytes]] = {}
    for p in pulled:
        by_stream.setdefault(p.stream, []).append(p.entry_id)
    for stream, ids in by_stream.items():
        pipe.xack(stream, keys.WORKER_GROUP, *ids)
        pipe.xdel(stream, *ids)


@dataclass(frozen=True)
class Finished:
    """What becomes of one held entry: its reply, and a reason if it is dead-lettered."""

    pulled: Pulled
    reply: Reply | None
    problem: str = ""  # set: the entry goes to the dead-letter stream with this reason

    def reply_stream(self) -> str | None:
        """Where its caller waits: the job's reply_to, or what a broken entry names."""
        if self.pulled.job is not None:
            return self.pulled.job.reply_to
        address = reply_address(self.pulled.raw or {})
        return None if address is None else address[1]

    def deadline_ms(self) -> int | None:
        """The job's deadline; None for an entry too broken to have one."""
        return None if self.pulled.job is None else self.pulled.job.deadline_ms


def _dead_letter_record(f: Finished) -> dict[bytes | str, bytes | str]:
    record: dict[bytes | str, bytes | str] = {
        "stream": f.pulled.stream,
        "entry_id": f.pulled.entry_id,
        "reason": f.problem,
    }
    record.update({b"field:" + k: v for k, v in (f.pulled.raw or {}).items()})
    return record


def _decode(stream: str, entry_id: bytes, fields: Fields, cipher: PayloadCipher | None) -> Pulled:
    try:
        job = Job.decode(fields, cipher)
    except UnreadablePayload as err:
        return Pulled(stream, entry_id, None, problem=str(err), raw=fields, unreadable=True)
    except MalformedMessage as err:
        return Pulled(stream, entry_id, None, problem=str(err), raw=fields)
    if job.head != keys.head_of_stream(stream):
        problem = f"job for head {job.head!r} found in stream {stream!r}"
        return Pulled(stream, entry_id, None, problem=problem, raw=fields)
    return Pulled(stream, entry_id, job, raw=fields)
