"""The worker's pipeline: pull, batch and compute, publish, with bounded holding.

    pull loop ──(inbox)──> batch loop ──(outbox)──> publish loop
    XREADGROUP, XAUTOCLAIM     Scheduler: cuts a batch     one MULTI per batch: reply
    while HeldWork has room;   when the encoder is free,   XADDs, dead letters, XACK,
    tokenize                   runs it on a thread         XDEL; retried until written

One bound governs the whole pipeline: a job counts against `HeldWork` from its pull
until its reply is written, and the pull loop is the only place that waits for room, so
the inbox and outbox need no bounds of their own and a backlog stays in the streams,
where every worker can take it. The batch loop owns the scheduler and the encoder: it
cuts the next batch the moment the previous one is computed (TEI's batching task:
reserve the compute slot, then cut), so jobs that arrive while the encoder runs form the
next batch. Replies and acknowledgements are one transaction: a reply Redis refuses
(down, or full under `noeviction`) leaves its job pending here, and the publish loop
retries it until Redis takes it or every caller of the batch has passed its deadline.
Stopping is staged: on `stop` health turns NOT_SERVING, the pull loop stops and each
later stage finishes what it holds; nothing awaits in a `finally`, so a drain that runs
out of time ends at once when cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from model.loaded import LoadedModel
from router import registry
from router.messages import ANALYZE_STREAM_HEAD, Reply
from taskmux.backoff import Backoff
from taskmux.health import Health
from taskmux.tracing import Tracing
from workers.batcher import Item, Scheduler
from workers.compute import BatchResult, compute
from workers.consumer import Finished, JobStreams, Pulled
from workers.held import HeldWork
from workers.metrics import WorkerMetrics
from workers.reload import manifest_stamp, reload_heads
from workers.settings import WorkerSettings
from workers.tracing import JobSpans

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0
# Replies wait for Redis to come back; retry often, so they land soon after it does.
PUBLISH_BACKOFF_MAX_S = 0.5
INLINE_TOKENIZE_CHARS = 2_000
# A batch this small (padded tokens), when it is all the worker holds apart from replies
# already sent to Redis, is computed on the event loop: it blocks the loop for a few ms
# at most, while the two thread wake-ups of `to_thread` cost a few hundred µs of a lone
# caller's latency and nothing else is there to overlap with it. Anything bigger, or with
# other work held or a reply not yet sent, runs on a thread.
INLINE_COMPUTE_TOKENS = 128
STATS_FLUSH_S = 0.5
RECLAIM_MAX_JOBS = 1_024


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


@dataclass(frozen=True)
class Outcome:
    """What the publish loop writes for one batch (or for entries answered without one)."""

    finished: list[Finished]
    result: BatchResult | None = None


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
            cipher=settings.payload_cipher,
        )
        self.held = HeldWork(settings.prefetch_batches * settings.max_batch_rows)
        # Unbounded on purpose: what they carry is bounded by `held`.
        self._inbox: asyncio.Queue[list[Item] | None] = asyncio.Queue()
        self._outbox: asyncio.Queue[Outcome | None] = asyncio.Queue()
        self._catalog_changed = asyncio.Event()
        self._published_all = asyncio.Event()
        self._unflushed: Counter[str] = Counter()  # counters not yet in Redis
        self._draining = False
        self._active_streams = 1  # streams that had work in the last pull
        self._writing = 0  # held entries whose replies are sent, awaiting Redis's answer

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then finish and acknowledge what was pulled."""
        await self._retry(self._streams.ensure_groups, stop)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._not_ready_on_stop(stop))
            tasks.create_task(self._catalog_loop(stop))
            if self.settings.reload_interval_ms:
                tasks.create_task(self._reload_loop(stop))
            tasks.create_task(self._pull_loop(stop))
            tasks.create_task(self._batch_loop())
            tasks.create_task(self._publish_loop())
            tasks.create_task(self._keepalive_loop())
            tasks.create_task(self._stats_loop())
        log.info("worker stopped: %s", self.stats)

    async def _not_ready_on_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._draining = True
        await self._set_ready(False)

    # --- pulling ---------------------------------------------------------------------

    async def _pull_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(BACKOFF_START_S, BACKOFF_MAX_S)
        recover_every_s = self.settings.claim_idle_ms / 3000
        next_recovery = time.monotonic()  # at start too: a restarted worker takes over
        try:
            while not stop.is_set():
                if not self.held.room():
                    await _until(stop, self.held.wait_for_room())
                    continue
                try:
                    if time.monotonic() >= next_recovery:
                        more = await self._recover()
                        # A dead worker's backlog is taken over as fast as room allows.
                        next_recovery = time.monotonic() + (0 if more else recover_every_s)
                        if more:
                            continue
                    count = self.held.jobs_to_ask(self._active_streams, self.settings.read_count)
                    pulled = await self._streams.read(count)
                except RedisError as err:
                    self.stats.redis_errors += 1
                    await self._set_ready(False)
                    wait_s = backoff.next_s()
                    log.warning("reading jobs failed (%s); retrying in %.1fs", err, wait_s)
                    await _sleep_or_stop(stop, wait_s)
                    continue
                if backoff.retrying:
                    self.stats.redis_reconnects += 1
                backoff.reset()
                await self._set_ready(True)
                if pulled:
                    self._active_streams = len({p.stream for p in pulled})
                    await self._accept(pulled)
        finally:
            self._inbox.put_nowait(None)

    async def _accept(self, pulled: list[Pulled], *, alone: bool = False) -> None:
        """Hold pulled entries; hand jobs to the batch loop, broken entries to publish."""
        self.held.hold(pulled)
        bad = [p for p in pulled if p.job is None]
        if bad:
            self._outbox.put_nowait(Outcome([self._undecodable(p) for p in bad]))
        good = [p for p in pulled if p.job is not None]
        if not good:
            return
        self.metrics.pulled(good)
        self._spans.pulled(good)
        # Small pulls are tokenized inline: a thread hop would cost more.
        chars = sum(len(t) for p in good if p.job for t in p.job.texts)
        if chars <= INLINE_TOKENIZE_CHARS:
            items = self._measure(good)
        else:
            items = await asyncio.to_thread(self._measure, good)
        if alone:
            items = [dataclasses.replace(i, alone=True) for i in items]
        self._inbox.put_nowait(items)
        # Let the batch loop take this work before the next read is built.
        await asyncio.sleep(0)

    async def _recover(self) -> bool:
        """Take over entries left idle too long by other consumers (dead or stuck), as
        many as there is room for; True when more may be waiting."""
        limit = self.held.jobs_to_ask(1, RECLAIM_MAX_JOBS)
        claimed, more = await self._streams.reclaim(self.settings.claim_idle_ms, limit)
        if not claimed:
            return more
        self.stats.reclaimed += len(claimed)
        log.warning("reclaimed %d pending entries from stalled workers", len(claimed))
        spent = [
            (p, n) for p, n in claimed if p.job is not None and n > self.settings.max_deliveries
        ]
        if spent:
            self.held.hold(p for p, _ in spent)
            self._outbox.put_nowait(Outcome([self._give_up(p, n) for p, n in spent]))
        retry = [p for p, n in claimed if p.job is None or n <= self.settings.max_deliveries]
        # Retried work runs alone: a job that crashed a worker cannot fail healthy ones.
        await self._accept(retry, alone=True)
        return more

    def _give_up(self, pulled: Pulled, deliveries: int) -> Finished:
        """A job that keeps failing: dead-letter it and tell its caller."""
        assert pulled.job is not None
        self.stats.dead_lettered += 1
        problem = f"delivered {deliveries} times without an answer; moved to the dead letters"
        log.error("job %s in %s: %s", pulled.job.id, pulled.stream, problem)
        self._spans.dead_lettered(pulled.job, problem)
        code = grpc.StatusCode.INTERNAL.value[0]
        return Finished(pulled, Reply(id=pulled.job.id, code=code, message=problem), problem)

    def _undecodable(self, pulled: Pulled) -> Finished:
        """An entry that is not a valid job: dead-letter it, answering its caller if known."""
        self.stats.malformed += 1
        self.stats.dead_lettered += 1
        log.warning("malformed entry %s in %s: %s", pulled.entry_id, pulled.stream, pulled.problem)
        address = None if pulled.raw is None else pulled.raw.get(b"id")
        if pulled.unreadable:  # not the request's fault: the deployment's keys differ
            code, what = grpc.StatusCode.FAILED_PRECONDITION, "the worker cannot read the request"
        else:
            code, what = grpc.StatusCode.INTERNAL, "the request could not be decoded by the worker"
        reply = Reply(
            id=address.decode("utf-8", "replace") if address is not None else "",
            code=code.value[0],
            message=f"{what}: {pulled.problem}",
        )
        return Finished(pulled, reply, pulled.problem)

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

    # --- batching and computing ------------------------------------------------------

    async def _batch_loop(self) -> None:
        s = self.settings
        scheduler = Scheduler(
            max_tokens=s.max_batch_tokens,
            max_rows=s.max_batch_rows,
            max_wait_s=s.max_wait_ms / 1000,
            weights=dict(s.task_weights),
        )
        open_inbox = True
        try:
            while open_inbox or len(scheduler):
                open_inbox = self._take_waiting(scheduler) and open_inbox
                if not len(scheduler):
                    if open_inbox:
                        open_inbox = _add(scheduler, await self._inbox.get())
                    continue
                wait_s = scheduler.wait_left_s(time.monotonic()) or 0.0
                if open_inbox and wait_s > 0 and not scheduler.full():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            open_inbox = _add(scheduler, await self._inbox.get())
                    continue
                batch = scheduler.take(int(time.time() * 1000))
                if batch.expired:
                    self._outbox.put_nowait(self._expired(batch.expired))
                if batch.items:
                    self._outbox.put_nowait(await self._compute(batch.items))
        finally:
            self._outbox.put_nowait(None)

    def _take_waiting(self, scheduler: Scheduler) -> bool:
        """Move what the inbox holds into the scheduler; False once the inbox is closed."""
        while not self._inbox.empty():
            if not _add(scheduler, self._inbox.get_nowait()):
                return False
        return True

    async def _compute(self, items: list[Item]) -> Outcome:
        batch = [i.pulled for i in items]
        jobs = [p.job for p in batch if p.job is not None]
        encodings = {
            text: encoding
            for i in items
            if i.pulled.job is not None
            for text, encoding in zip(i.pulled.job.texts, i.encodings, strict=False)
        }
        inline = self._outbox.empty() and computes_inline(items, len(self.held) - self._writing)
        run = functools.partial(
            compute,
            self.model,
            jobs,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_batch_rows=self.settings.max_batch_rows,
            encodings=encodings,
            alone=inline,
        )
        self.metrics.busy.set(1)
        try:
            result = run() if inline else await asyncio.to_thread(run)
        finally:
            self.metrics.busy.set(0)
        self._count(batch, result)
        self.metrics.computed(result)
        self._spans.computed(jobs, result)
        problems = result.problems or ("",) * len(batch)
        finished = [
            Finished(p, r, problem)
            for p, r, problem in zip(batch, result.replies, problems, strict=True)
        ]
        self.stats.dead_lettered += sum(1 for f in finished if f.problem)
        return Outcome(finished, result)

    def _expired(self, items: list[Item]) -> Outcome:
        """Replies for jobs whose deadline passed while they waited: no encoder work."""
        code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        finished = [
            Finished(
                i.pulled,
                Reply(id=i.pulled.job.id, code=code, message="deadline passed while queued"),
            )
            for i in items
            if i.pulled.job is not None
        ]
        self.stats.expired += len(finished)
        replies = [f.reply for f in finished if f.reply is not None]
        return Outcome(finished, BatchResult(replies, None, len(replies), 0))

    # --- publishing ------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        try:
            while (outcome := await self._outbox.get()) is not None:
                await self._publish(outcome)
        finally:
            self._published_all.set()

    async def _publish(self, outcome: Outcome) -> None:
        """Write the outcome, retrying until Redis takes it. Jobs stay held (and so
        refreshed, never reclaimed) meanwhile, and the bound on held work stops pulling.
        If Redis refuses and every caller has passed its deadline, acknowledging alone
        is enough: nobody waits for those replies, and it frees memory."""
        if outcome.result is not None:
            self._add_counters(len(outcome.finished), outcome.result)
        finished = outcome.finished
        done = [(f.pulled, f.reply) for f in finished if f.reply is not None]
        backoff = Backoff(BACKOFF_START_S, PUBLISH_BACKOFF_MAX_S)
        start_ns = time.time_ns()
        self._writing = len(finished)
        while True:
            start = time.perf_counter()
            try:
                await self._write(finished)
                break
            except RedisError as err:
                self.stats.redis_errors += 1
                wait_s = backoff.next_s()
                log.warning(
                    "could not publish %d replies (%s); keeping them, retrying in %.1fs",
                    len(finished),
                    err,
                    wait_s,
                )
                await asyncio.sleep(wait_s)
        self.metrics.stage.labels("reply").observe(time.perf_counter() - start)
        self._spans.published(done, start_ns)
        self.held.release(f.pulled for f in finished)
        self._writing = 0

    async def _write(self, finished: list[Finished]) -> None:
        try:
            await self._streams.finish(finished)
        except RedisError:
            if not _all_late(finished):
                raise
            await self._streams.acknowledge([f.pulled for f in finished])

    def _add_counters(self, jobs: int, result: BatchResult) -> None:
        encoded = result.encoded
        self._unflushed.update(
            {
                "batches": 1,
                "jobs": jobs,
                "encoder_rows": encoded.rows if encoded else 0,
                "head_results": result.results,
                "expired": result.expired,
                "real_tokens": encoded.real_tokens if encoded else 0,
                "padded_tokens": encoded.padded_tokens if encoded else 0,
            }
        )

    # --- background ------------------------------------------------------------------

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
        """Refresh the idle time of every entry we hold, even while the pipeline is full
        or replies wait for Redis, so held work is never reclaimed from under us."""
        while not self._published_all.is_set():
            await _sleep_or_stop(self._published_all, self.settings.claim_idle_ms / 3000)
            held = self.held.by_stream()
            if not held:
                continue
            try:
                await self._streams.touch(held)
            except RedisError as err:
                log.warning("could not refresh held entries: %s", err)

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

    async def _set_ready(self, ready: bool) -> None:
        ready = ready and not self._draining
        if self._health is not None and self._health.ready != ready:
            await self._health.set_ready(ready)

    async def _retry(self, op: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
        """Run `op` until it succeeds or `stop` is set (Redis may not be up yet)."""
        backoff = Backoff(BACKOFF_START_S, BACKOFF_MAX_S)
        while not stop.is_set():
            try:
                await op()
                return
            except RedisError as err:
                wait_s = backoff.next_s()
                log.warning("Redis not ready (%s); retrying in %.1fs", err, wait_s)
                await _sleep_or_stop(stop, wait_s)


def _add(scheduler: Scheduler, items: list[Item] | None) -> bool:
    """Queue pulled items; False for the inbox's end marker."""
    for item in items or ():
        scheduler.add(item)
    return items is not None


def computes_inline(items: list[Item], held_jobs: int) -> bool:
    """True for a batch of at most INLINE_COMPUTE_TOKENS padded tokens that is all of the
    `held_jobs` the worker holds (replies sent aside): no other job waits to overlap."""
    padded = sum(i.rows for i in items) * max((i.longest for i in items), default=0)
    return padded <= INLINE_COMPUTE_TOKENS and held_jobs == len(items)


def _all_late(finished: list[Finished]) -> bool:
    """True when every entry has a deadline and all of them have passed."""
    now_ms = time.time() * 1000
    deadlines = [f.deadline_ms() for f in finished]
    return all(d is not None and d < now_ms for d in deadlines)


async def _until(stop: asyncio.Event, waiting: Coroutine[Any, Any, None]) -> None:
    """Await `waiting`, or return early once `stop` is set."""
    task = asyncio.ensure_future(waiting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopped.cancel()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
