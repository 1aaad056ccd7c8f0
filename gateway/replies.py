"""The reply path: one reply stream per gateway, one reader task, one future per call.

Waiting calls never touch Redis themselves: they register a future under their request
id, and the single reader resolves it when the worker's reply arrives. The first reply
for an id wins; later ones (duplicates after a redelivery) are dropped. A second task
keeps the stream alive (creates it if missing, refreshes its TTL) on its own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from router import keys
from router.messages import MalformedMessage, Reply, stream_entries
from taskmux.backoff import Backoff
from taskmux.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000
READ_COUNT = 512
# Waits between failed reads, capped low: calls in flight wait for this reader once Redis
# is back.
READ_RETRY_START_S = 0.1
READ_RETRY_MAX_S = 0.5


class ReplyRouter:
    """Owns this gateway's reply stream and the task that reads it."""

    def __init__(
        self, redis: aioredis.Redis, gateway_id: str, *, ttl_s: int, keep_alive_interval_s: float
    ) -> None:
        self.stream = keys.reply_stream(gateway_id)
        self._redis = redis
        self._ttl_s = ttl_s
        self._keep_alive_interval_s = keep_alive_interval_s
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReplyRouter:
        # Before any call: a reply to a stream that does not exist yet is dropped.
        await self._try_keep_alive()
        self._keeper = asyncio.create_task(self._keep_alive_loop(), name="reply-keep-alive")
        self._reader = asyncio.create_task(self._read_loop(), name="reply-reader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._reader)
        await cancel_and_wait(self._keeper)
        for future in self._waiting.values():
            future.cancel()
        with contextlib.suppress(RedisError):  # if not, it expires on its own
            await self._redis.delete(self.stream)

    def expect(self, request_id: str) -> asyncio.Future[Reply]:
        """A future resolved with the reply for `request_id`; call `forget` when done."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        """Stop waiting for `request_id` (answered, timed out, or cancelled)."""
        self._waiting.pop(request_id, None)

    async def keep_alive(self) -> None:
        """Create the reply stream if missing and push its expiry forward."""
        if not await self._redis.exists(self.stream):
            # XADD then XDEL leaves an empty stream, which workers' NOMKSTREAM can write to.
            entry = await self._redis.xadd(self.stream, {"v": "init"})
            await self._redis.xdel(self.stream, entry)
        await self._redis.expire(self.stream, self._ttl_s)

    async def _keep_alive_loop(self) -> None:
        while True:
            await asyncio.sleep(self._keep_alive_interval_s)
            await self._try_keep_alive()

    async def _try_keep_alive(self) -> None:
        try:
            await self.keep_alive()
        except RedisError as err:  # the health check reports Redis; retried next round
            log.warning("could not keep the reply stream alive: %s", err)

    async def _read_loop(self) -> None:
        # From the start: the stream is this gateway's own, and read entries are deleted.
        # ("$" would miss replies that land between two XREAD calls.)
        last_id = b"0-0"
        backoff = Backoff(READ_RETRY_START_S, READ_RETRY_MAX_S)
        while True:
            try:
                response = await self._redis.xread(
                    {self.stream: last_id}, count=READ_COUNT, block=READ_BLOCK_MS
                )
                backoff.reset()
            except RedisError as err:
                wait_s = backoff.next_s()
                log.warning("reading replies failed (%s); retrying in %.1fs", err, wait_s)
                await asyncio.sleep(wait_s)
                continue
            for _, entries in stream_entries(response):
                if not entries:
                    continue
                for entry_id, fields in entries:
                    self._deliver(entry_id, fields)
                last_id = entries[-1][0]
                # Let the callers just woken answer before this round trip, not after it.
                await asyncio.sleep(0)
                try:
                    await self._redis.xdel(self.stream, *(e for e, _ in entries))
                except RedisError as err:
                    log.warning("could not delete %d read replies: %s", len(entries), err)

    def _deliver(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            reply = Reply.decode(fields)
        except MalformedMessage as err:
            if fields.get(b"v") != b"init":
                log.warning("dropping malformed reply %s: %s", entry_id, err)
            return
        future = self._waiting.pop(reply.id, None)
        if future is not None and not future.done():
            future.set_result(reply)
