"""The worker's spans: one per job, from its gateway's enqueue span to its published reply.

    job <head>       CONSUMER, child of the Job's traceparent; enqueued_ms -> reply written
      queue wait     enqueued_ms -> pulled by this worker
      tokenize       the job's pull group being tokenized
      encode         the batch's encoder pass   (batch timing; taskmux.batch.* attributes)
      heads          the batch's heads          (batch timing)
      publish reply  XADD reply + XACK + XDEL of the batch

A batch is shared by many jobs, often from different calls. Each job gets its own child
spans carrying the batch's timing and size, so every trace reads top to bottom on its own
in Jaeger; one batch span with links to each job would sit in a trace of its own, one
click away from every request it served. The stages run in other loops (and threads), so
their spans are recorded afterwards with explicit start and end times.

Off, every method returns at once. Attributes never carry texts or labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Final

import grpc
from opentelemetry.trace import Span, SpanKind, set_span_in_context
from opentelemetry.util.types import Attributes
from taskmux_api.kinds import TaskKind

from router.messages import Job, Reply
from taskmux.tracing import Tracing, parent_context, status_of
from workers.compute import BatchResult
from workers.consumer import Pulled

MS: Final = 1_000_000  # nanoseconds
UNAVAILABLE: Final = grpc.StatusCode.UNAVAILABLE


class JobSpans:
    """The open span of every job this worker holds, keyed by job id."""

    def __init__(self, tracing: Tracing, worker_id: str) -> None:
        self._tracing = tracing
        self._worker_id = worker_id
        self._open: dict[str, Span] = {}

    def pulled(self, pulled: Iterable[Pulled]) -> None:
        """Open the span of each decoded job just read from (or reclaimed into) a stream."""
        if not self._tracing.enabled:
            return
        now = time.time_ns()
        for p in pulled:
            if p.job is None:
                continue
            # Another clock queued it; a start in our future would put the child first.
            start = min(p.job.enqueued_ms * MS, now) if p.job.enqueued_ms > 0 else now
            span = self._tracing.start_span(
                f"job {p.job.head}",
                kind=SpanKind.CONSUMER,
                parent=parent_context(p.job.traceparent),
                start_ns=start,
                attributes=self._job_attributes(p.stream, p.job),
            )
            if (stale := self._open.pop(p.job.id, None)) is not None:
                stale.end()  # reclaimed by this very worker: the first attempt is over
            self._open[p.job.id] = span
            self._child(span, "queue wait", start, now)

    def stage(
        self, name: str, jobs: Iterable[Job], start_ns: int, attributes: Attributes = None
    ) -> None:
        """A child span of each job, from `start_ns` until now."""
        if not self._tracing.enabled:
            return
        end = time.time_ns()
        for job in jobs:
            if (span := self._open.get(job.id)) is not None:
                self._child(span, name, start_ns, end, attributes)

    def computed(self, jobs: Sequence[Job], result: BatchResult) -> None:
        """The batch's encode and heads spans, under each of its jobs."""
        if not self._tracing.enabled or result.encoded is None:
            return
        stats = result.encoded
        batch = {
            "taskmux.batch.jobs": len(jobs),
            "taskmux.batch.rows": stats.rows,
            "taskmux.batch.padded_tokens": stats.padded_tokens,
            "taskmux.batch.real_tokens": stats.real_tokens,
        }
        encoded = result.started_ns + int(result.encode_s * 1e9)
        done = encoded + int(result.heads_s * 1e9)
        for job in jobs:
            if (span := self._open.get(job.id)) is not None:
                self._child(span, "encode", result.started_ns, encoded, batch)
                self._child(span, "heads", encoded, done, batch)

    def published(
        self, done: Sequence[tuple[Pulled, Reply]], start_ns: int, *, failed: bool = False
    ) -> None:
        """The publish span of each job, then the end of its job span."""
        if not self._tracing.enabled:
            return
        end = time.time_ns()
        for pulled, reply in done:
            if pulled.job is None or (span := self._open.pop(pulled.job.id, None)) is None:
                continue
            self._child(span, "publish reply", start_ns, end, {"taskmux.failed": failed})
            if failed:
                # Left pending in Redis: reclaimed and answered by a later delivery.
                status_of(span, UNAVAILABLE.value[0], "reply not published")
            else:
                status_of(span, reply.code, "OK" if reply.code == 0 else f"code {reply.code}")
            span.end(end_time=end)

    def dead_lettered(self, job: Job, problem: str) -> None:
        """End the span of a job given up on, if this worker still holds one open for it."""
        if (span := self._open.pop(job.id, None)) is not None:
            status_of(span, grpc.StatusCode.INTERNAL.value[0], problem)
            span.end()

    def _child(
        self, parent: Span, name: str, start_ns: int, end_ns: int, attributes: Attributes = None
    ) -> None:
        span = self._tracing.start_span(
            name, parent=set_span_in_context(parent), start_ns=start_ns, attributes=attributes
        )
        span.end(end_time=max(end_ns, start_ns))

    def _job_attributes(self, stream: str, job: Job) -> dict[str, str | int | list[str]]:
        attributes: dict[str, str | int | list[str]] = {
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.destination.name": stream,
            "messaging.message.id": job.id,
            "taskmux.kind": job.kind,
            "taskmux.head": job.head,
            "taskmux.texts": len(job.texts),
            "taskmux.worker_id": self._worker_id,
        }
        if job.kind == TaskKind.ANALYZE and isinstance(heads := job.params.get("heads"), list):
            attributes["taskmux.heads"] = [str(h) for h in heads]
        if job.request_id:
            attributes["taskmux.request_id"] = job.request_id
        return attributes
