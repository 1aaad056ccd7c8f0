"""Worker in this event loop on a real Valkey and the real model, with this test as the
gateway: it takes jobs added by hand, writes replies that decode, acknowledges and
deletes each entry, dead-letters what it cannot read, and stops cleanly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from taskmux_api.v1 import taskmux_pb2 as pb

from model.loaded import LoadedModel
from model.manifest import load_manifest
from router import keys
from router.connection import RedisSettings
from router.messages import Job, Reply
from tests.harness import wait_until_async
from workers.settings import WorkerSettings
from workers.worker import INLINE_COMPUTE_TOKENS, Worker

WAIT_S = 60  # only bounds a hang: every wait below ends on an event


@pytest.fixture(scope="module")
def settings(valkey_url: str, model_repo: Path) -> WorkerSettings:
    return WorkerSettings(
        redis=RedisSettings(url=valkey_url),
        model_repo=model_repo,
        worker_id=f"direct-{uuid.uuid4().hex[:8]}",
        intra_op_threads=1,
        block_ms=100,
        reload_interval_ms=0,
        metrics_addr="",
    )


@pytest.fixture(scope="module")
def model(settings: WorkerSettings) -> LoadedModel:
    return LoadedModel.load(settings)


@dataclass
class Running:
    worker: Worker
    stop: asyncio.Event
    task: asyncio.Task[None]
    replies: str  # the reply stream this test reads, as a gateway would


@pytest.fixture
async def running(
    settings: WorkerSettings, model: LoadedModel, aredis: aioredis.Redis
) -> AsyncIterator[Running]:
    replies = keys.reply_stream(f"direct-{uuid.uuid4().hex[:8]}")
    # Workers write replies only to a stream that exists (NOMKSTREAM), as a gateway's does.
    await aredis.xdel(replies, await aredis.xadd(replies, {"v": "init"}))
    worker = Worker(settings, model, aredis)
    stop = asyncio.Event()
    run = Running(worker, stop, asyncio.create_task(worker.run(stop)), replies)
    yield run
    stop.set()
    async with asyncio.timeout(WAIT_S):
        await run.task  # a failure inside the worker's loops fails the test here


def _job(replies: str, kind: str, head: str, texts: tuple[str, ...], top_k: int = 0) -> Job:
    now_ms = int(time.time() * 1000)
    return Job(
        id=uuid.uuid4().hex,
        reply_to=replies,
        deadline_ms=now_ms + 60_000,
        kind=kind,
        head=head,
        texts=texts,
        top_k=top_k,
        enqueued_ms=now_ms,
    )


async def _replies(aredis: aioredis.Redis, stream: str, count: int) -> dict[str, Reply]:
    async def arrived() -> bool:
        return await aredis.xlen(stream) >= count

    await wait_until_async(arrived, WAIT_S, f"{count} replies on {stream}")
    return {(r := Reply.decode(f)).id: r for _, f in await aredis.xrange(stream)}


async def _settled(aredis: aioredis.Redis, head: str) -> None:
    """Wait until `head`'s stream holds no entry and nothing is pending in the group."""
    stream = keys.task_stream(head)

    async def empty() -> bool:
        pending = await aredis.xpending(stream, keys.WORKER_GROUP)
        return await aredis.xlen(stream) == 0 and pending["pending"] == 0

    await wait_until_async(empty, WAIT_S, f"{stream} acknowledged and deleted")


async def test_jobs_added_by_hand_are_answered_acknowledged_and_deleted(
    running: Running, aredis: aioredis.Redis, model_repo: Path
) -> None:
    embed = _job(running.replies, "embed", "embed", ("a first text", "a second one"))
    classify = _job(running.replies, "classify", "sentiment", ("what a lovely day",), top_k=1)
    for job in (embed, classify):
        await aredis.xadd(keys.task_stream(job.head), job.encode())  # type: ignore[arg-type]

    replies = await _replies(aredis, running.replies, 2)
    assert {r.code for r in replies.values()} == {0}, replies
    embedded = pb.EmbedResponse.FromString(replies[embed.id].body)
    vectors = np.array([e.values for e in embedded.embeddings])
    dimension = load_manifest(model_repo, verify=False).encoder.dimension
    assert vectors.shape == (2, dimension)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    classified = pb.ClassifyResponse.FromString(replies[classify.id].body)
    assert classified.head == "sentiment"
    (result,) = classified.results
    assert [t.label for t in result.top] == [result.label] and 0 < result.score <= 1
    for head in ("embed", "sentiment"):
        await _settled(aredis, head)
    assert running.worker.stats.jobs == 2


async def test_a_text_computed_on_the_loop_matches_it_computed_on_a_thread(
    running: Running, aredis: aioredis.Redis
) -> None:
    """A lone short job is computed on the event loop (INLINE_COMPUTE_TOKENS); next to a
    text too long for that, the same text goes through a thread: the same embedding."""
    text = "the same words either way"
    long_text = " ".join(["word"] * (INLINE_COMPUTE_TOKENS + 8))
    vectors = []
    for texts in ((text,), (text, long_text)):
        job = _job(running.replies, "embed", "embed", texts)
        await aredis.xadd(keys.task_stream("embed"), job.encode())  # type: ignore[arg-type]
        replies = await _replies(aredis, running.replies, len(vectors) + 1)
        assert replies[job.id].code == 0, replies[job.id]
        embedded = pb.EmbedResponse.FromString(replies[job.id].body)
        vectors.append(np.array(embedded.embeddings[0].values))
    assert np.allclose(vectors[0], vectors[1], atol=1e-4)
    assert running.worker.stats.padded_tokens > INLINE_COMPUTE_TOKENS  # the second went long


async def test_an_entry_it_cannot_read_is_dead_lettered_and_deleted(
    running: Running, aredis: aioredis.Redis
) -> None:
    broken = {"v": "1", "id": "broken", "reply_to": running.replies, "texts": "not json"}
    entry_id = await aredis.xadd(keys.task_stream("embed"), broken)  # type: ignore[arg-type]

    async def dead_lettered() -> bool:
        return await aredis.xlen(keys.DEAD_LETTER_STREAM) >= 1

    await wait_until_async(dead_lettered, WAIT_S, "the dead letter")
    ((_, letter),) = await aredis.xrange(keys.DEAD_LETTER_STREAM)
    assert letter[b"entry_id"] == entry_id
    assert letter[b"stream"] == keys.task_stream("embed").encode()
    assert letter[b"reason"]
    await _settled(aredis, "embed")
    assert running.worker.stats.dead_lettered == 1


async def test_stop_ends_the_run_and_withdraws_the_worker(
    settings: WorkerSettings, model: LoadedModel, aredis: aioredis.Redis
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(settings, model, aredis).run(stop))

    async def registered() -> bool:
        return bool(await aredis.sismember(keys.WORKERS_KEY, settings.worker_id))

    await wait_until_async(registered, WAIT_S, "the worker in the registry")
    assert await aredis.exists(keys.worker_catalog(settings.worker_id))
    stop.set()
    async with asyncio.timeout(WAIT_S):
        await task
    assert not await aredis.sismember(keys.WORKERS_KEY, settings.worker_id)
    assert not await aredis.exists(keys.worker_catalog(settings.worker_id))
