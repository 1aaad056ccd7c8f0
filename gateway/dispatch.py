"""Queueing one validated request and waiting for its reply."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import DeadlineExceeded, Unavailable, worker_error
from gateway.replies import ReplyRouter
from router import keys
from router.messages import Job

# Answer a little before the client's own deadline fires, so it sees our status.
DEADLINE_MARGIN_S = 0.02


class Dispatcher:
    """Puts jobs on their task stream and awaits the reply within the deadline."""

    def __init__(
        self, redis: aioredis.Redis, replies: ReplyRouter, *, default_timeout_ms: int
    ) -> None:
        self._redis = redis
        self._replies = replies
        self._default_timeout_s = default_timeout_ms / 1000

    async def run(
        self,
        *,
        kind: str,
        head: str,
        texts: tuple[str, ...],
        top_k: int,
        time_remaining_s: float | None,
        params: dict[str, Any] | None = None,
    ) -> bytes:
        """The serialized response body from a worker, or a TaskmuxError."""
        timeout_s = self._default_timeout_s
        if time_remaining_s is not None:
            timeout_s = min(timeout_s, time_remaining_s)
        now = time.time()
        job = Job(
            id=uuid.uuid4().hex,
            reply_to=self._replies.stream,
            deadline_ms=int((now + timeout_s) * 1000),
            kind=kind,
            head=head,
            texts=texts,
            top_k=top_k,
            enqueued_ms=int(now * 1000),
            params=params or {},
        )
        future = self._replies.expect(job.id)
        try:
            try:
                await self._redis.xadd(keys.task_stream(head), job.encode())  # type: ignore[arg-type]
            except RedisError as err:
                raise Unavailable(
                    f"the task queue is unreachable ({type(err).__name__}); retry"
                ) from err
            try:
                reply = await asyncio.wait_for(future, max(timeout_s - DEADLINE_MARGIN_S, 0.001))
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no result within {timeout_s:.3f}s; workers may be busy or absent"
                ) from None
        finally:
            self._replies.forget(job.id)
        if reply.code != 0:
            raise worker_error(reply.code, reply.message)
        return reply.body
