"""Queueing validated requests, bounded per head, and waiting for their replies."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
import redis.asyncio as aioredis
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from gateway.errors import (
    DeadlineExceeded,
    ResourceExhausted,
    TaskmuxError,
    redis_errors,
    worker_error,
)
from gateway.idempotency import ClaimOnEnqueue, KeyTaken
from gateway.replies import ReplyRouter
from router import keys, scripts
from router.messages import ANALYZE_STREAM_HEAD, Job, Reply, UnreadablePayload
from router.payload import PayloadCipher
from router.turns import ScriptTurns
from taskmux.tracing import Tracing, status_of

# Answer a little before the client's own deadline fires, so it sees our status.
DEADLINE_MARGIN_S = 0.02
# Awaited when a call's jobs were not queued (full backlog, Redis refused or unreachable).
NotQueued = Callable[[], Awaitable[None]]
# What the await-reply span is when tracing is off: reusable, and free to enter.
NO_SPAN = contextlib.nullcontext(INVALID_SPAN)
# What ENQUEUE answers when the idempotency record it was to claim is another call's.
KEY_TAKEN = -1


class Dispatcher:
    """Puts jobs on their task stream and awaits the replies within the deadline."""

    def __init__(
        self,
        redis: aioredis.Redis,
        replies: ReplyRouter,
        *,
        default_timeout_ms: int,
        max_backlog: int,
        retry_after_ms: int,
        tracing: Tracing | None = None,
        cipher: PayloadCipher | None = None,
    ) -> None:
        self._redis = redis
        self._cipher = cipher  # seals each job's texts and params; None: plaintext
        self._tracing = tracing or Tracing()
        self._replies = replies
        self._default_timeout_s = default_timeout_ms / 1000
        self._max_backlog = max_backlog
        self._retry_after_ms = retry_after_ms
        # Each event-loop turn's enqueues go in one pipeline (router/turns.py).
        self._enqueues = ScriptTurns(redis, scripts.ENQUEUE)

    def timeout_s(self, time_remaining_s: float | None) -> float:
        """The time a call may take: its deadline, capped by the default timeout."""
        if time_remaining_s is None:
            return self._default_timeout_s
        return min(self._default_timeout_s, time_remaining_s)

    async def run(
        self,
        *,
        kind: str,
        head: str,
        texts: tuple[str, ...],
        top_k: int,
        timeout_s: float,
        params: dict[str, Any] | None = None,
        request_id: str = "",
        not_queued: NotQueued | None = None,
        claim: ClaimOnEnqueue | None = None,
    ) -> bytes:
        """The serialized response body from a worker, or a TaskmuxError.

        `not_queued` is awaited before the error if the job could not be queued: the
        caller undoes what it did for a job that will not run (a tenant's charge, say).
        `claim`, if given, is written by the enqueue itself; if its key is another call's,
        nothing is queued and `KeyTaken` is raised.
        """
        sending = self._enqueue_span(head, 1)
        traceparent = self._tracing.traceparent(sending)
        (job,) = self._jobs(kind, head, [texts], top_k, timeout_s, params, request_id, traceparent)
        future = self._replies.expect(job.id)
        try:
            await self._enqueue(head, [job], sending, not_queued, claim)
            with self._await_span(1):
                try:
                    # Not wait_for: on Python 3.11 it adds an event-loop turn to every reply.
                    async with asyncio.timeout(max(timeout_s - DEADLINE_MARGIN_S, 0.001)):
                        reply = await future
                except TimeoutError:
                    raise _deadline(timeout_s) from None
                return self._body(reply)
        finally:
            self._replies.forget(job.id)

    async def run_many(
        self,
        *,
        kind: str,
        head: str,
        texts_per_job: Sequence[tuple[str, ...]],
        top_k: int,
        timeout_s: float,
        params: dict[str, Any] | None = None,
        request_id: str = "",
        not_queued: NotQueued | None = None,
    ) -> AsyncGenerator[tuple[int, bytes]]:
        """(job index, body) for several jobs on one stream, in the order they finish.

        The jobs are queued together (all or none); the first failed reply raises.
        `not_queued` as for `run`.
        """
        sending = self._enqueue_span(head, len(texts_per_job))
        traceparent = self._tracing.traceparent(sending)
        jobs = self._jobs(
            kind, head, texts_per_job, top_k, timeout_s, params, request_id, traceparent
        )
        futures = {self._replies.expect(job.id): i for i, job in enumerate(jobs)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s - DEADLINE_MARGIN_S, 0.001)
        try:
            await self._enqueue(head, jobs, sending, not_queued)
            with self._await_span(len(jobs)) as waiting:
                pending: set[asyncio.Future[Reply]] = set(futures)
                while pending:
                    done, pending = await asyncio.wait(
                        pending,
                        timeout=max(deadline - loop.time(), 0),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not done:
                        raise _deadline(timeout_s)
                    for future in done:
                        waiting.add_event("reply", {"taskmux.job_index": futures[future]})
                        yield futures[future], self._body(future.result())
        finally:
            for job in jobs:
                self._replies.forget(job.id)

    def _jobs(
        self,
        kind: str,
        head: str,
        texts_per_job: Sequence[tuple[str, ...]],
        top_k: int,
        timeout_s: float,
        params: dict[str, Any] | None,
        request_id: str,
        traceparent: str,
    ) -> list[Job]:
        now = time.time()
        return [
            Job(
                id=uuid.uuid4().hex,
                reply_to=self._replies.stream,
                deadline_ms=int((now + timeout_s) * 1000),
                kind=kind,
                head=head,
                texts=texts,
                top_k=top_k,
                enqueued_ms=int(now * 1000),
                params=params or {},
                request_id=request_id,
                traceparent=traceparent,
            )
            for texts in texts_per_job
        ]

    def _body(self, reply: Reply) -> bytes:
        if reply.code != 0:
            raise worker_error(reply.code, reply.message)
        try:
            return reply.payload(self._cipher, self._replies.stream)
        except UnreadablePayload as err:
            raise worker_error(grpc.StatusCode.FAILED_PRECONDITION.value[0], str(err)) from None

    def _enqueue_span(self, head: str, jobs: int) -> Span:
        """The span the jobs' traceparent names: the workers' spans are its children."""
        if not self._tracing.enabled:
            return INVALID_SPAN  # without building the attributes
        return self._tracing.start_span(
            f"enqueue {head}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.destination.name": keys.task_stream(head),
                "taskmux.jobs": jobs,
            },
        )

    def _await_span(self, jobs: int) -> contextlib.AbstractContextManager[Span]:
        """From queued until every reply is in: its end is the trace's way back from the
        workers. Its status is that of the error that ends the wait, if any."""
        if not self._tracing.enabled:
            return NO_SPAN
        return self._awaiting(jobs)

    @contextlib.contextmanager
    def _awaiting(self, jobs: int) -> Iterator[Span]:
        span = self._tracing.start_span("await reply", attributes={"taskmux.jobs": jobs})
        code = grpc.StatusCode.OK
        try:
            yield span
        except TaskmuxError as err:
            code = err.code
            raise
        except BaseException:  # the caller went away (cancelled, or stopped reading)
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            status_of(span, code.value[0], code.name)
            span.end()

    async def _enqueue(
        self,
        head: str,
        jobs: Sequence[Job],
        span: Span,
        not_queued: NotQueued | None,
        claim: ClaimOnEnqueue | None = None,
    ) -> None:
        """XADD every job to the head's stream, unless its backlog is full (or `claim`'s
        key is taken); ends `span`."""
        names = [keys.task_stream(head)]
        args: list[str | int | bytes] = [self._max_backlog, len(jobs)]
        for job in jobs:
            fields = [x for pair in job.encode(self._cipher).items() for x in pair]
            args += [len(fields), *fields]
        if claim is not None:
            names.append(claim.name)
            args += [claim.value, claim.lease_ms]
        try:
            with redis_errors("the task queue"):
                added, backlog = await self._enqueues.call(names, args)
        except TaskmuxError as err:
            _end_enqueue(span, err.code)
            if not_queued is not None:
                await not_queued()
            raise
        except BaseException:  # cancelled: the jobs may or may not be queued
            span.end()
            raise
        if added == KEY_TAKEN:
            _end_enqueue(span, grpc.StatusCode.ALREADY_EXISTS, backlog)
            if not_queued is not None:
                await not_queued()
            raise KeyTaken
        _end_enqueue(span, grpc.StatusCode.OK if added else ResourceExhausted.code, backlog)
        if not added:
            if not_queued is not None:
                await not_queued()
            queue = "the Analyze queue" if head == ANALYZE_STREAM_HEAD else f"the queue of {head!r}"
            raise ResourceExhausted(
                f"{queue} is full ({backlog} jobs waiting, the limit is {self._max_backlog}); "
                f"retry after {self._retry_after_ms} ms",
                retry_after_ms=self._retry_after_ms,
            )


def _end_enqueue(span: Span, code: grpc.StatusCode, backlog: int | None = None) -> None:
    if backlog is not None:
        span.set_attribute("taskmux.backlog", backlog)
    status_of(span, code.value[0], code.name)
    span.end()


def _deadline(timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"no result within {timeout_s:.3f}s; workers may be busy or absent")
