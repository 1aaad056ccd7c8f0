"""The worker's Prometheus metrics: per-stage latency, batch shape, outcomes, backlog.

Counters are read at scrape time from `WorkerStats`, which the worker's loops own;
histograms are observed by the loops; backlog and pending per head are sampled from
Redis (XLEN, XPENDING) every `SAMPLE_EVERY_S` by `BacklogSampler`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterator
from types import TracebackType
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from router import keys
from taskmux.lifecycle import cancel_and_wait

if TYPE_CHECKING:
    from workers.compute import BatchResult
    from workers.consumer import Pulled
    from workers.worker import WorkerStats

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 5.0
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768)
RATIO_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
# WorkerStats field -> (metric name, help)
COUNTERS = {
    "encoder_rows": ("taskmux_worker_encoder_rows", "Texts the encoder ran."),
    "head_results": ("taskmux_worker_head_results", "Head results delivered (text x head)."),
    "jobs": ("taskmux_worker_jobs", "Jobs answered, whatever the outcome."),
    "batches": ("taskmux_worker_batches", "Batches computed."),
    "expired": ("taskmux_worker_expired", "Jobs whose deadline passed before compute."),
    "dead_lettered": ("taskmux_worker_dead_lettered", "Entries moved to the dead letters."),
    "malformed": ("taskmux_worker_malformed", "Entries that could not be decoded."),
    "reclaimed": ("taskmux_worker_reclaimed", "Pending entries taken from stalled workers."),
    "redis_errors": ("taskmux_worker_redis_errors", "Failed Redis operations."),
    "redis_reconnects": ("taskmux_worker_redis_reconnects", "Recoveries after Redis errors."),
}


class _StatsCollector(Collector):
    def __init__(self, stats: WorkerStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        values = dataclasses.asdict(self._stats)
        for field, (name, documentation) in COUNTERS.items():
            yield CounterMetricFamily(name, documentation, value=values[field])


class WorkerMetrics:
    """The metrics of one worker process, in their own registry."""

    def __init__(self, stats: WorkerStats) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(stats))
        self.stage = Histogram(
            "taskmux_worker_stage_seconds",
            "Time per pipeline stage: queue (enqueued to pulled), tokenize, encode, heads, reply.",
            ("stage",),
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "taskmux_worker_batch_rows",
            "Texts per encoder batch.",
            buckets=SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "taskmux_worker_batch_tokens",
            "Padded tokens per encoder batch.",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.padding_efficiency = Histogram(
            "taskmux_worker_padding_efficiency",
            "Real tokens over padded tokens, per batch.",
            buckets=RATIO_BUCKETS,
            registry=self.registry,
        )
        self.busy = Gauge(
            "taskmux_worker_busy",
            "1 while the encoder runs a batch.",
            registry=self.registry,
        )
        self.backlog = Gauge(
            "taskmux_queue_backlog",
            "Entries in a head's task stream (XLEN), sampled.",
            ("head",),
            registry=self.registry,
        )
        self.pending = Gauge(
            "taskmux_queue_pending",
            "Entries delivered to workers and not yet acknowledged (XPENDING), sampled.",
            ("head",),
            registry=self.registry,
        )

    def pulled(self, pulled: list[Pulled]) -> None:
        """Observe how long each job waited in its stream before a worker pulled it."""
        now_ms = time.time() * 1000
        for p in pulled:
            if p.job is not None and p.job.enqueued_ms > 0:
                self.stage.labels("queue").observe(max(now_ms - p.job.enqueued_ms, 0) / 1000)

    def computed(self, result: BatchResult) -> None:
        """Observe one computed batch."""
        if result.encoded is None:
            return
        stats = result.encoded
        self.stage.labels("encode").observe(result.encode_s)
        self.stage.labels("heads").observe(result.heads_s)
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.padded_tokens)
        if stats.padded_tokens:
            self.padding_efficiency.observe(stats.real_tokens / stats.padded_tokens)


class BacklogSampler:
    """Owns the task that samples each head's backlog and pending count from Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        metrics: WorkerMetrics,
        heads: Callable[[], Collection[str]],
        every_s: float = SAMPLE_EVERY_S,
    ) -> None:
        self._redis = redis
        self._metrics = metrics
        self._heads = heads
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BacklogSampler:
        self._task = asyncio.create_task(self._loop(), name="backlog-sampler")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample()
            except RedisError as err:
                log.debug("could not sample the backlog: %s", err)
            await asyncio.sleep(self._every_s)

    async def sample(self) -> None:
        """Read XLEN and the XPENDING summary of every head's stream once."""
        heads = sorted(self._heads())
        pipe = self._redis.pipeline(transaction=False)
        for head in heads:
            pipe.xlen(keys.task_stream(head))
        for head in heads:
            pipe.xpending(keys.task_stream(head), keys.WORKER_GROUP)
        answers = await pipe.execute(raise_on_error=False)
        for head, length, pending in zip(heads, answers, answers[len(heads) :], strict=False):
            if isinstance(length, int):
                self._metrics.backlog.labels(head).set(length)
            if isinstance(pending, dict):
                self._metrics.pending.labels(head).set(int(pending.get("pending", 0)))
