"""The enqueue script claiming an idempotency record on the way, on a real Valkey: it
claims and queues in one step, queues nothing for a key another call holds (the
dispatcher raises `KeyTaken` and undoes the caller's charge), and claims nothing when
the backlog is full."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.dispatch import KEY_TAKEN, Dispatcher
from gateway.errors import ResourceExhausted
from gateway.idempotency import ClaimOnEnqueue, KeyTaken
from gateway.replies import ReplyRouter
from router import keys, scripts

LEASE_MS = 3_000


def _claim(name: str, value: bytes = b"pending claim") -> ClaimOnEnqueue:
    return ClaimOnEnqueue(name, value, LEASE_MS, wanted=b"", same=frozenset())


@pytest.fixture
async def dispatcher(aredis: aioredis.Redis) -> AsyncIterator[Dispatcher]:
    async with ReplyRouter(
        aredis, f"claim-{uuid.uuid4().hex[:8]}", ttl_s=60, keep_alive_interval_s=60
    ) as replies:
        yield Dispatcher(
            aredis, replies, default_timeout_ms=1_000, max_backlog=2, retry_after_ms=100
        )


async def _enqueue(aredis: aioredis.Redis, stream: str, record: str, backlog: int) -> list[int]:
    script = aredis.register_script(scripts.ENQUEUE)
    job = ["id", uuid.uuid4().hex]
    args: list[str | int | bytes] = [backlog, 1, len(job), *job, b"mine", LEASE_MS]
    return [int(x) for x in await script(keys=[stream, record], args=args)]


async def test_the_script_claims_and_queues_once_then_refuses_the_key(
    aredis: aioredis.Redis,
) -> None:
    stream = keys.task_stream(f"claim-{uuid.uuid4().hex[:8]}")
    record = keys.idempotency_key("embed", "", uuid.uuid4().hex)
    assert await _enqueue(aredis, stream, record, backlog=10) == [1, 1]
    assert await aredis.get(record) == b"mine"
    assert 0 < await aredis.pttl(record) <= LEASE_MS
    assert await _enqueue(aredis, stream, record, backlog=10) == [KEY_TAKEN, 1]
    assert await aredis.xlen(stream) == 1  # the second job was not queued


async def test_a_full_backlog_claims_nothing(aredis: aioredis.Redis) -> None:
    stream = keys.task_stream(f"claim-{uuid.uuid4().hex[:8]}")
    record = keys.idempotency_key("embed", "", uuid.uuid4().hex)
    await aredis.xadd(stream, {"id": "already waiting"})
    assert await _enqueue(aredis, stream, record, backlog=1) == [0, 1]
    assert not await aredis.exists(record)


async def test_the_dispatcher_raises_key_taken_and_undoes_the_charge(
    dispatcher: Dispatcher, aredis: aioredis.Redis
) -> None:
    head = f"claim-{uuid.uuid4().hex[:8]}"
    record = keys.idempotency_key("embed", "", uuid.uuid4().hex)
    await aredis.set(record, b"another call's claim", px=LEASE_MS)
    undone: list[bool] = []

    async def refund() -> None:
        undone.append(True)

    with pytest.raises(KeyTaken):
        await dispatcher.run(
            kind="embed",
            head=head,
            texts=("x",),
            top_k=0,
            timeout_s=1,
            not_queued=refund,
            claim=_claim(record),
        )
    assert undone == [True]
    assert await aredis.xlen(keys.task_stream(head)) == 0
    assert await aredis.get(record) == b"another call's claim"


async def test_a_full_queue_is_still_resource_exhausted_with_a_claim(
    dispatcher: Dispatcher, aredis: aioredis.Redis
) -> None:
    head = f"claim-{uuid.uuid4().hex[:8]}"
    record = keys.idempotency_key("embed", "", uuid.uuid4().hex)
    for _ in range(2):  # the dispatcher's max_backlog
        await aredis.xadd(keys.task_stream(head), {"id": "waiting"})
    with pytest.raises(ResourceExhausted):
        await dispatcher.run(
            kind="embed", head=head, texts=("x",), top_k=0, timeout_s=1, claim=_claim(record)
        )
    assert not await aredis.exists(record)
