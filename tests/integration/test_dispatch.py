"""Dispatcher in this event loop on a real Valkey, with this test as the worker: jobs land
on their head's stream with the fields the worker reads, replies resolve the calls, and a
missed deadline, a full backlog and an unreachable Redis raise the documented errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from gateway.dispatch import Dispatcher
from gateway.errors import DeadlineExceeded, ResourceExhausted, Unavailable, WorkerError
from gateway.replies import ReplyRouter
from router import keys
from router.messages import Job, Reply
from taskmux.local import free_port
from tests.harness import wait_until_async

MAX_BACKLOG = 3
RETRY_AFTER_MS = 250
WAIT_S = 10  # only bounds a hang: every wait below ends on an event


@pytest.fixture
async def replies(aredis: aioredis.Redis) -> AsyncIterator[ReplyRouter]:
    gateway_id = f"direct-{uuid.uuid4().hex[:8]}"  # reply streams outlive the keyspace reset
    async with ReplyRouter(aredis, gateway_id, ttl_s=60, keep_alive_interval_s=1) as router:
        yield router


@pytest.fixture
def dispatcher(aredis: aioredis.Redis, replies: ReplyRouter) -> Dispatcher:
    return _dispatcher(aredis, replies)


def _dispatcher(redis: aioredis.Redis, replies: ReplyRouter) -> Dispatcher:
    return Dispatcher(
        redis,
        replies,
        default_timeout_ms=30_000,
        max_backlog=MAX_BACKLOG,
        retry_after_ms=RETRY_AFTER_MS,
    )


async def _queued(aredis: aioredis.Redis, head: str, count: int) -> list[Job]:
    """The jobs on `head`'s stream, once there are `count` of them."""
    stream = keys.task_stream(head)

    async def arrived() -> bool:
        return await aredis.xlen(stream) >= count

    await wait_until_async(arrived, WAIT_S, f"{count} jobs on {stream}")
    return [Job.decode(fields) for _, fields in await aredis.xrange(stream)]


async def _one(dispatcher: Dispatcher, head: str, **options: Any) -> bytes:
    """Run one job of one text on `head`."""
    return await dispatcher.run(kind="classify", head=head, texts=("x",), top_k=1, **options)


class Refund:
    """A `not_queued` callback that counts its calls (a tenant's charge given back)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


async def _reply(aredis: aioredis.Redis, job: Job, reply: Reply) -> None:
    await aredis.xadd(job.reply_to, reply.encode())  # type: ignore[arg-type]


async def test_run_queues_one_job_with_its_fields_and_returns_the_reply_body(
    dispatcher: Dispatcher, replies: ReplyRouter, aredis: aioredis.Redis
) -> None:
    before_ms = int(time.time() * 1000)
    call = asyncio.create_task(
        dispatcher.run(
            kind="classify",
            head="sentiment",
            texts=("what a day", "ünïcode ✓"),
            top_k=2,
            timeout_s=20,
            params={"note": "kept"},
            request_id="req-7",
        )
    )
    (job,) = await _queued(aredis, "sentiment", 1)
    assert (job.kind, job.head, job.texts, job.top_k) == (
        "classify",
        "sentiment",
        ("what a day", "ünïcode ✓"),
        2,
    )
    assert (job.params, job.request_id, job.reply_to) == ({"note": "kept"}, "req-7", replies.stream)
    assert before_ms <= job.enqueued_ms <= int(time.time() * 1000)
    assert abs(job.deadline_ms - job.enqueued_ms - 20_000) <= 1  # now + timeout_s
    assert [k async for k in aredis.scan_iter(match=keys.task_stream("*"))] == [
        keys.task_stream("sentiment").encode()
    ]
    await _reply(aredis, job, Reply(job.id, 0, body=b"the response"))
    async with asyncio.timeout(WAIT_S):
        assert await call == b"the response"


async def test_a_failed_reply_raises_the_workers_status(
    dispatcher: Dispatcher, aredis: aioredis.Redis
) -> None:
    call = asyncio.create_task(
        dispatcher.run(kind="embed", head="embed", texts=("x",), top_k=0, timeout_s=20)
    )
    (job,) = await _queued(aredis, "embed", 1)
    code = grpc.StatusCode.INVALID_ARGUMENT
    await _reply(aredis, job, Reply(job.id, code.value[0], message="text too long"))
    with pytest.raises(WorkerError, match="text too long") as info:
        async with asyncio.timeout(WAIT_S):
            await call
    assert info.value.code == code


async def test_no_reply_by_the_deadline_raises_deadline_exceeded(
    dispatcher: Dispatcher, aredis: aioredis.Redis
) -> None:
    with pytest.raises(DeadlineExceeded, match=r"no result within 0\.200s"):
        await dispatcher.run(kind="embed", head="embed", texts=("x",), top_k=0, timeout_s=0.2)
    (job,) = await _queued(aredis, "embed", 1)  # queued: a worker drops it past its deadline
    assert abs(job.deadline_ms - job.enqueued_ms - 200) <= 1


async def test_a_full_backlog_queues_nothing_and_undoes_the_callers_work(
    dispatcher: Dispatcher, aredis: aioredis.Redis
) -> None:
    for i in range(MAX_BACKLOG):
        await aredis.xadd(keys.task_stream("intent"), {"filler": str(i)})
    refund = Refund()
    with pytest.raises(ResourceExhausted, match="the queue of 'intent' is full") as info:
        await _one(dispatcher, "intent", timeout_s=5, not_queued=refund)
    assert info.value.retry_after_ms == RETRY_AFTER_MS
    assert refund.calls == 1
    assert await aredis.xlen(keys.task_stream("intent")) == MAX_BACKLOG


async def test_run_many_queues_every_job_and_yields_each_body_with_its_index(
    dispatcher: Dispatcher, aredis: aioredis.Redis
) -> None:
    texts = [("a",), ("b", "c"), ("d",)]
    got: list[tuple[int, bytes]] = []

    async def collect() -> None:
        async for index, body in dispatcher.run_many(
            kind="embed", head="embed", texts_per_job=texts, top_k=0, timeout_s=20
        ):
            got.append((index, body))

    call = asyncio.create_task(collect())
    jobs = await _queued(aredis, "embed", 3)
    assert [j.texts for j in jobs] == texts
    assert len({j.id for j in jobs}) == 3
    for job in reversed(jobs):
        await _reply(aredis, job, Reply(job.id, 0, body=job.texts[0].encode()))
    async with asyncio.timeout(WAIT_S):
        await call
    assert sorted(got) == [(0, b"a"), (1, b"b"), (2, b"d")]


async def test_an_unreachable_redis_is_unavailable_and_undoes_the_callers_work(
    replies: ReplyRouter,
) -> None:
    nowhere = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    refund = Refund()
    try:
        with pytest.raises(Unavailable, match="unreachable"):
            await _one(_dispatcher(nowhere, replies), "embed", timeout_s=5, not_queued=refund)
    finally:
        await nowhere.aclose()
    assert refund.calls == 1


async def test_calls_of_one_turn_share_a_pipeline_but_each_checks_the_backlog(
    dispatcher: Dispatcher, aredis: aioredis.Redis
) -> None:
    """Five calls started together: their enqueues go out in one pipeline, yet each is its
    own script run, so the first MAX_BACKLOG are queued and the rest refused."""
    refunds = [Refund() for _ in range(5)]
    calls = [
        asyncio.create_task(_one(dispatcher, "topic", timeout_s=20, not_queued=refund))
        for refund in refunds
    ]
    jobs = await _queued(aredis, "topic", MAX_BACKLOG)
    for job in jobs:
        await _reply(aredis, job, Reply(job.id, 0, body=job.id.encode()))
    async with asyncio.timeout(WAIT_S):
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert sorted(o for o in outcomes if isinstance(o, bytes)) == sorted(
        j.id.encode() for j in jobs
    )
    refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    assert len(refused) == 5 - MAX_BACKLOG
    assert sum(r.calls for r in refunds) == 5 - MAX_BACKLOG
    assert await aredis.xlen(keys.task_stream("topic")) == MAX_BACKLOG


async def test_a_flushed_script_cache_is_reloaded_and_the_job_queued(
    dispatcher: Dispatcher, aredis: aioredis.Redis
) -> None:
    """After a Redis restart or SCRIPT FLUSH the pipeline's EVALSHA answers NOSCRIPT: the
    dispatcher loads the script again and the call goes through."""
    await aredis.script_flush()
    call = asyncio.create_task(_one(dispatcher, "intent", timeout_s=20))
    (job,) = await _queued(aredis, "intent", 1)
    await _reply(aredis, job, Reply(job.id, 0, body=b"ok"))
    async with asyncio.timeout(WAIT_S):
        assert await call == b"ok"
