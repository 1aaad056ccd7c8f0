"""The worker's pipeline: pull, batch, compute and publish overlap as owned tasks.

    pull loop ─(inbox)─> batch loop ─(1 batch)─> compute loop ─(queue)─> publish loop
    XREADGROUP over      Scheduler: token       encoder + heads       XADD replies,
    every task stream,   budget, row cap,       on a thread, never    XACK, XDEL,
    tokenize (thread)    wait, fairness,        the event loop        counters
                         expired jobs out

While the encoder runs batch N, batch N+1 is being formed from jobs already pulled and
tokenized, and batch N-1's replies are being written. Stopping is staged: the pull loop
stops taking work, and each later stage finishes what it holds before it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from router import registry
from router.messages import ANALYZE_STREAM_HEAD, Reply
from taskmux.health import Health
from taskmux.tracing import Tracing
from workers.batcher import Item, Scheduler
from workers.compute import BatchResult, compute
from workers.consumer import JobStreams, Pulled
from workers.metrics import WorkerMetrics
from workers.model import LoadedModel
from workers.reload import manifest_stamp, reload_heads
from workers.settings import WorkerSettings
from workers.tracing import JobSpans

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.1
INLINE_TOKENIZE_CHARS = 2_000
STATS_FLUSH_S = 0.5
BACKOFF_MAX_S = 5.0


@dataclass
class WorkerStats:
    """Counters owned by the worker's loops."""

    batches: int = 0
    jobs: int = 0
    encoder_rows: int = 0
    head_results: int = 0
    expired: int = 0
    malformed: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    redis_errors: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    redis_reconnects: int = 0


class Worker:
    """Serves every head of one model repository from the shared task streams."""

    def __init__(
        self,
        settings: WorkerSettings,
        model: LoadedModel,
        redis: aioredis.Redis,
        health: Health | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self._spans = JobSpans(tracing or Tracing(), settings.worker_id)
        self._health = health
        self.model = model
        self.stats = WorkerStats()
        self.metrics = WorkerMetrics(self.stats)
        self._redis = redis
        self._streams = JobStreams(
            redis,
            [*model.heads, ANALYZE_STREAM_HEAD],
            settings.worker_id,
            read_count=settings.read_count,
            block_ms=settings.block_ms,
        )
        self._inbox: asyncio.Queue[list[Item] | None] = asyncio.Queue(
            maxsize=settings.prefetch_batches
        )
        # One batch waits while the encoder runs the previous one.
        self._to_compute: asyncio.Queue[list[Item] | None] = asyncio.Queue(maxsize=1)
        self._catalog_changed = asyncio.Event()
        self._held: dict[str, set[bytes]] = {}
        self._published_all = asyncio.Event()
        self._unflushed: Counter[str] = Counter()  # counters not yet in Redis
        self._computing = False
        self._encoder_free = asyncio.Event()  # entries pulled and not yet acknowledged
        self._to_publish: asyncio.Queue[tuple[list[Pulled], BatchResult] | None] = asyncio.Queue(
            maxsize=2
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then finish and acknowledge what was pulled."""
        await self._retry(self._streams.ensure_groups, stop)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._catalog_loop(stop))
            if self.settings.reload_interval_ms:
                tasks.create_task(self._reload_loop(stop))
            tasks.create_task(self._pull_loop(stop))
            tasks.create_task(self._batch_loop())
            tasks.create_task(self._compute_loop())
            tasks.create_task(self._publish_loop())
            tasks.create_task(self._keepalive_loop())
            tasks.create_task(self._stats_loop())
        log.info("worker stopped: %s", self.stats)

    async def _pull_loop(self, stop: asyncio.Event) -> None:
        backoff = BACKOFF_START_S
        # Reclaiming runs here, between reads, so one coroutine feeds the inbox and
        # closes it on shutdown.
        recover_every_s = self.settings.claim_idle_ms / 3000
        next_recovery = time.monotonic() + recover_every_s
        try:
            while not stop.is_set():
                try:
                    if time.monotonic() >= next_recovery:
                        await self._recover()
                        next_recovery = time.monotonic() + recover_every_s
                    pulled = await self._streams.read()
                    self._hold(pulled)
                    if backoff != BACKOFF_START_S:
                        self.stats.redis_reconnects += 1
                    backoff = BACKOFF_START_S
                    await self._set_ready(True)
                except RedisError as err:
                    self.stats.redis_errors += 1
                    await self._set_ready(False)
                    log.warning("reading jobs failed (%s); retrying in %.1fs", err, backoff)
                    await _sleep_or_stop(stop, backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                good = [p for p in pulled if p.job is not None]
                self.metrics.pulled(good)
                self._spans.pulled(good)
                for bad in (p for p in pulled if p.job is None):
                    await self._dead_letter(bad)
                if good:
                    # Small pulls are tokenized inline: a thread hop would cost more.
                    chars = sum(len(t) for p in good if p.job for t in p.job.texts)
                    if chars <= INLINE_TOKENIZE_CHARS:
                        await self._inbox.put(self._measure(good))
                    else:
                        await self._inbox.put(await asyncio.to_thread(self._measure, good))
                    # Let the batch loop hand this work on before the next read is built.
                    await asyncio.sleep(0)
        finally:
            await self._inbox.put(None)

    async def _stats_loop(self) -> None:
        """Flush the counters to Redis twice a second, off the reply path."""
        while True:
            finished = self._published_all.is_set()
            if self._unflushed:
                counters, self._unflushed = dict(self._unflushed), Counter()
                try:
                    await self._streams.add_counters(counters)
                except RedisError as err:
                    self._unflushed.update(counters)
                    log.warning("could not update counters: %s", err)
            if finished:
                return
            await _sleep_or_stop(self._published_all, STATS_FLUSH_S)

    async def _keepalive_loop(self) -> None:
        """Refresh the idle time of every entry we hold, even while the pipeline is full,
        so slow work is never reclaimed from under us."""
        while not self._published_all.is_set():
            await _sleep_or_stop(self._published_all, self.settings.claim_idle_ms / 3000)
            try:
                await self._streams.touch(self._held)
            except RedisError as err:
                log.warning("could not refresh held entries: %s", err)

    async def _recover(self) -> None:
        """Take over entries left idle too long by other consumers (dead or stuck)."""
        claimed = await self._streams.reclaim(self.settings.claim_idle_ms, self.settings.read_count)
        if not claimed:
            return
        self._hold([p for p, _ in claimed])
        retry = []
        for pulled, deliveries in claimed:
            if pulled.job is None:
                await self._dead_letter(pulled)
            elif deliveries > self.settings.max_deliveries:
                await self._give_up(pulled, deliveries)
            else:
                retry.append(pulled)
        self.stats.reclaimed += len(claimed)
        log.warning("reclaimed %d pending entries from stalled workers", len(claimed))
        if retry:
            self._spans.pulled(retry)
            items = await asyncio.to_thread(self._measure, retry)
            await self._inbox.put([dataclasses.replace(i, alone=True) for i in items])

    async def _give_up(self, pulled: Pulled, deliveries: int) -> None:
        """A job that keeps failing: dead-letter it and tell its caller."""
        assert pulled.job is not None
        job_id = pulled.job.id
        self.stats.dead_lettered += 1
        problem = f"delivered {deliveries} times without an answer; moved to the dead letters"
        log.error("job %s in %s: %s", job_id, pulled.stream, problem)
        self._spans.dead_lettered(pulled.job, problem)
        reply = Reply(id=job_id, code=grpc.StatusCode.INTERNAL.value[0], message=problem)
        try:
            await self._streams.dead_letter(dataclasses.replace(pulled, problem=problem), reply)
        except RedisError as err:
            log.error("could not dead-letter %s: %s", pulled.entry_id, err)
        self._release([pulled])

    def _hold(self, pulled: list[Pulled]) -> None:
        for p in pulled:
            self._held.setdefault(p.stream, set()).add(p.entry_id)

    def _release(self, pulled: list[Pulled]) -> None:
        for p in pulled:
            self._held.get(p.stream, set()).discard(p.entry_id)

    def _measure(self, pulled: list[Pulled]) -> list[Item]:
        """Tokenize each job's texts (off the event loop) to know its size in tokens."""
        tokenizer = self.model.encoder.tokenizer
        now = time.monotonic()
        start, start_ns = time.perf_counter(), time.time_ns()
        items = []
        for p in pulled:
            assert p.job is not None
            encodings = tuple(tokenizer.encode_batch(list(p.job.texts)))
            longest = max((len(e.ids) for e in encodings), default=1)
            items.append(Item(p, len(encodings), longest, now, encodings=encodings))
        self.metrics.stage.labels("tokenize").observe(time.perf_counter() - start)
        self._spans.stage("tokenize", (p.job for p in pulled if p.job is not None), start_ns)
        return items

    async def _batch_loop(self) -> None:
        s = self.settings
        scheduler = Scheduler(
            max_tokens=s.max_batch_tokens,
            max_rows=s.max_batch_rows,
            max_wait_s=s.max_wait_ms / 1000,
            weights=dict(s.task_weights),
        )
        open_inbox = True
        # One outstanding get, kept across timeouts: cancelling a get can drop its item.
        getter: asyncio.Task[list[Item] | None] | None = None
        try:
            while open_inbox or len(scheduler):
                wait_s = scheduler.wait_left_s(time.monotonic())
                # Close a batch when it is full, when its oldest job has waited max_wait, or
                # at once when the encoder is idle: waiting then would only add latency.
                # While a batch already waits for the encoder, keep filling the next one.
                can_hand_over = not self._to_compute.full()
                close = (
                    len(scheduler) > 0
                    and can_hand_over
                    and (scheduler.full() or wait_s == 0 or self._encoder_idle() or not open_inbox)
                )
                if not close and not len(scheduler) and getter is None:
                    # Nothing to time out on: wait for work directly, a hop fewer than a task.
                    items = await self._inbox.get()
                    if items is None:
                        open_inbox = False
                    for item in items or ():
                        scheduler.add(item)
                    continue
                if not close:
                    getter = getter or asyncio.create_task(self._inbox.get())
                    waiters: set[asyncio.Task[Any]] = {getter}
                    if len(scheduler):  # only then can the encoder freeing up close a batch
                        self._encoder_free.clear()
                        waiters.add(asyncio.create_task(self._encoder_free.wait()))
                    timeout = wait_s if can_hand_over else None
                    done, _ = await asyncio.wait(
                        waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    for waiter in waiters - {getter}:
                        waiter.cancel()
                    if getter in done:
                        items, getter = getter.result(), None
                        if items is None:
                            open_inbox = False
                        else:
                            for item in items:
                                scheduler.add(item)
                    continue
                batch = scheduler.take(int(time.time() * 1000))
                if batch.expired:
                    await self._to_publish.put(self._expired(batch.expired))
                if batch.items:
                    await self._to_compute.put(batch.items)
        finally:
            if getter is not None:
                getter.cancel()
            await self._to_compute.put(None)

    def _expired(self, items: list[Item]) -> tuple[list[Pulled], BatchResult]:
        """Replies for jobs whose deadline passed while they waited: no encoder work."""
        code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        pulled = [i.pulled for i in items]
        replies = [
            Reply(id=p.job.id, code=code, message="deadline passed while queued")
            for p in pulled
            if p.job is not None
        ]
        self.stats.expired += len(replies)
        return pulled, BatchResult(replies, None, len(replies), 0)

    async def _set_ready(self, ready: bool) -> None:
        if self._health is not None and self._health.ready != ready:
            await self._health.set_ready(ready)

    def _encoder_idle(self) -> bool:
        return not self._computing and self._to_compute.empty()

    async def _compute_loop(self) -> None:
        try:
            while (items := await self._to_compute.get()) is not None:
                self._computing = True
                self.metrics.busy.set(1)
                batch = [i.pulled for i in items]
                jobs = [p.job for p in batch if p.job is not None]
                encodings = {
                    text: encoding
                    for i in items
                    if i.pulled.job is not None
                    for text, encoding in zip(i.pulled.job.texts, i.encodings, strict=False)
                }
                try:
                    result = await asyncio.to_thread(
                        compute,
                        self.model,
                        jobs,
                        max_batch_tokens=self.settings.max_batch_tokens,
                        max_batch_rows=self.settings.max_batch_rows,
                        encodings=encodings,
                    )
                finally:
                    self._computing = False
                    self.metrics.busy.set(0)
                    self._encoder_free.set()
                self._count(batch, result)
                self.metrics.computed(result)
                self._spans.computed(jobs, result)
                await self._to_publish.put((batch, result))
        finally:
            await self._to_publish.put(None)

    async def _publish_loop(self) -> None:
        try:
            await self._publish_all()
        finally:
            self._published_all.set()

    async def _publish_all(self) -> None:
        while (item := await self._to_publish.get()) is not None:
            batch, result = item
            done = list(zip(batch, result.replies, strict=True))
            self._unflushed.update(
                {
                    "batches": 1,
                    "jobs": len(batch),
                    "encoder_rows": result.encoded.rows if result.encoded else 0,
                    "head_results": result.results,
                    "expired": result.expired,
                    "real_tokens": result.encoded.real_tokens if result.encoded else 0,
                    "padded_tokens": result.encoded.padded_tokens if result.encoded else 0,
                }
            )
            start_ns = time.time_ns()
            try:
                start = time.perf_counter()
                await self._retry_finite(partial(self._streams.finish, done))
                self.metrics.stage.labels("reply").observe(time.perf_counter() - start)
                self._spans.published(done, start_ns)
                self._release(batch)
            except RedisError as err:
                # The entries stay pending in the group; no longer refreshed, they are
                # reclaimed (by any worker, this one included) after claim_idle_ms.
                log.error("could not publish %d replies: %s", len(done), err)
                self._spans.published(done, start_ns, failed=True)
                self._release(batch)

    async def _reload_loop(self, stop: asyncio.Event) -> None:
        repo = Path(self.settings.model_repo)
        stamp = manifest_stamp(repo)
        while not stop.is_set():
            await _sleep_or_stop(stop, self.settings.reload_interval_ms / 1000)
            if (now := manifest_stamp(repo)) == stamp:
                continue
            stamp = now
            model = await asyncio.to_thread(reload_heads, self.model, repo)
            if model is self.model:
                continue
            # Batches already computing hold the previous object and finish on it.
            self.model = model
            try:
                await self._streams.set_heads([*model.heads, ANALYZE_STREAM_HEAD])
            except RedisError as err:
                log.warning("could not create groups for reloaded heads: %s", err)
            self._catalog_changed.set()

    async def _catalog_loop(self, stop: asyncio.Event) -> None:
        worker_id = self.settings.worker_id
        ttl_s = 3 * self.settings.catalog_refresh_s
        while not stop.is_set():
            catalog = self.model.manifest.to_json(with_checksums=False)
            try:
                await registry.publish(self._redis, worker_id, catalog, ttl_s)
            except RedisError as err:
                self.stats.redis_errors += 1
                log.warning("publishing the catalog failed: %s", err)
            self._catalog_changed.clear()
            changed = asyncio.create_task(self._catalog_changed.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait(
                [changed, stopped],
                timeout=self.settings.catalog_refresh_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            changed.cancel()
            stopped.cancel()
        with contextlib.suppress(RedisError):
            await registry.withdraw(self._redis, worker_id)  # it no longer serves anything

    async def _dead_letter(self, pulled: Pulled) -> None:
        self.stats.malformed += 1
        self.stats.dead_lettered += 1
        log.warning("malformed entry %s in %s: %s", pulled.entry_id, pulled.stream, pulled.problem)
        reply = Reply(
            id="",
            code=grpc.StatusCode.INTERNAL.value[0],
            message=f"the request could not be decoded by the worker: {pulled.problem}",
        )
        address = None if pulled.raw is None else pulled.raw.get(b"id")
        if address is not None:
            reply = Reply(
                id=address.decode("utf-8", "replace"), code=reply.code, message=reply.message
            )
        try:
            await self._streams.dead_letter(pulled, reply)
        except RedisError as err:
            log.error("could not dead-letter %s: %s", pulled.entry_id, err)
        self._release([pulled])

    def _count(self, batch: list[Pulled], result: BatchResult) -> None:
        s = self.stats
        s.batches += 1
        s.jobs += len(batch)
        s.expired += result.expired
        s.head_results += result.results
        if result.encoded is not None:
            s.encoder_rows += result.encoded.rows
            s.real_tokens += result.encoded.real_tokens
            s.padded_tokens += result.encoded.padded_tokens

    async def _retry(self, op: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
        """Run `op` until it succeeds or `stop` is set (Redis may not be up yet)."""
        backoff = BACKOFF_START_S
        while not stop.is_set():
            try:
                await op()
                return
            except RedisError as err:
                log.warning("Redis not ready (%s); retrying in %.1fs", err, backoff)
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _retry_finite(self, op: Callable[[], Awaitable[None]], attempts: int = 5) -> None:
        backoff = BACKOFF_START_S
        for attempt in range(attempts):
            try:
                await op()
                return
            except RedisError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
