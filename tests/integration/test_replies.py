"""ReplyRouter in this event loop on a real Valkey: replies reach their waiting call, the
first reply wins, unknown and malformed entries are dropped, and the stream is kept."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.replies import ReplyRouter
from router.messages import Reply
from tests.harness import wait_until_async

KEEP_ALIVE_S = 0.05
WAIT_S = 10  # only bounds a hang: every wait below ends on an event


@pytest.fixture
async def router(aredis: aioredis.Redis) -> AsyncIterator[ReplyRouter]:
    gateway_id = f"direct-{uuid.uuid4().hex[:8]}"  # reply streams outlive the keyspace reset
    async with ReplyRouter(
        aredis, gateway_id, ttl_s=60, keep_alive_interval_s=KEEP_ALIVE_S
    ) as replies:
        yield replies


async def _answered(router: ReplyRouter, aredis: aioredis.Redis, reply: Reply) -> Reply:
    """Add `reply` to the router's stream and wait for the call that expects it."""
    future = router.expect(reply.id)
    await aredis.xadd(router.stream, reply.encode())  # type: ignore[arg-type]
    async with asyncio.timeout(WAIT_S):
        return await future


async def test_a_reply_resolves_its_call_and_is_deleted(
    router: ReplyRouter, aredis: aioredis.Redis
) -> None:
    sent = Reply("call-1", 0, body=b"\x00serialized response\xff")
    assert await _answered(router, aredis, sent) == sent

    async def deleted() -> bool:
        return await aredis.xlen(router.stream) == 0

    await wait_until_async(deleted, WAIT_S, "the read reply deleted")


async def test_unknown_ids_and_malformed_entries_are_dropped(
    router: ReplyRouter, aredis: aioredis.Redis
) -> None:
    await aredis.xadd(router.stream, Reply("nobody-waits", 0, body=b"lost").encode())  # type: ignore[arg-type]
    await aredis.xadd(router.stream, {"v": "9", "id": "from-the-future"})
    await aredis.xadd(router.stream, {"v": "1"})  # no id
    # Entries are read in order: once this one is answered, the three before it are past.
    assert (await _answered(router, aredis, Reply("marker", 0))).id == "marker"
    late = router.expect("nobody-waits")  # nothing kept the earlier reply for it
    assert (await _answered(router, aredis, Reply("marker-2", 0))).id == "marker-2"
    assert not late.done()
    router.forget("nobody-waits")


async def test_the_first_reply_for_an_id_wins(router: ReplyRouter, aredis: aioredis.Redis) -> None:
    future = router.expect("twice")
    first, second = Reply("twice", 0, body=b"first"), Reply("twice", 13, message="redelivered")
    await aredis.xadd(router.stream, first.encode())  # type: ignore[arg-type]
    await aredis.xadd(router.stream, second.encode())  # type: ignore[arg-type]
    assert (await _answered(router, aredis, Reply("marker", 0))).id == "marker"
    assert future.result() == first


async def test_a_failed_reply_is_delivered_as_it_came(
    router: ReplyRouter, aredis: aioredis.Redis
) -> None:
    failed = Reply("bad", 3, message="text too long")
    assert await _answered(router, aredis, failed) == failed


async def test_the_stream_is_kept_alive_and_deleted_on_exit(aredis: aioredis.Redis) -> None:
    replies = ReplyRouter(
        aredis, f"direct-{uuid.uuid4().hex[:8]}", ttl_s=60, keep_alive_interval_s=KEEP_ALIVE_S
    )
    assert not await aredis.exists(replies.stream)
    async with replies:
        assert await aredis.type(replies.stream) == b"stream"
        assert 0 < await aredis.ttl(replies.stream) <= 60
        await aredis.delete(replies.stream)  # e.g. Redis restarted without persistence

        async def recreated() -> bool:
            return bool(await aredis.exists(replies.stream))

        await wait_until_async(recreated, WAIT_S, "the stream recreated by the keep-alive")
        waiting = replies.expect("never-answered")
    assert waiting.cancelled()
    assert not await aredis.exists(replies.stream)
