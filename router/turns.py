"""One Lua script run for many callers, one pipeline per event-loop turn.

Calls that arrive together (a burst, or callers woken by one batch of replies) cost one
round trip and one pooled connection, not one each. Each caller keeps its own script run,
so whatever the script checks and does all-or-none stays its own, and each gets its own
reply or error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

Arg = str | int | bytes
Queued = tuple[list[str], list[Arg], "asyncio.Future[Any]"]


class ScriptTurns:
    """Runs the Lua script `source` on Redis for every `call` of one event-loop turn in
    one pipeline (EVALSHA each, loading the script again if Redis lost it)."""

    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self._redis = redis
        self._source = source
        self._sha = redis.register_script(source).sha
        self._turn: list[Queued] = []  # this turn's calls, not yet sent
        # Pipelines on their way; each ends within the Redis client's socket timeout.
        self._sending: set[asyncio.Task[None]] = set()

    def call(self, names: list[str], args: list[Arg]) -> asyncio.Future[Any]:
        """The script's reply on the keys `names` with `args`, or its error (a Redis
        error of this command or of the whole pipeline)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._turn:
            # A task's first step runs once this turn's callbacks have: it takes them all.
            task = loop.create_task(self._send_turn())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._turn.append((names, args, future))
        return future

    async def _send_turn(self) -> None:
        turn, self._turn = self._turn, []
        await self._send(turn)

    async def _send(self, turn: list[Queued]) -> None:
        """Answer every call of `turn`. A caller that has gone (cancelled) is skipped."""
        try:
            results = await self._pipeline(turn)
            lost = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if lost:  # Redis restarted or flushed its scripts: load it, resend those once
                await self._redis.script_load(self._source)
                again = await self._pipeline([turn[i] for i in lost])
                for i, result in zip(lost, again, strict=True):
                    results[i] = result
        except Exception as err:
            results = [err] * len(turn)
        except BaseException:  # shutting down: nobody will read an answer
            for _, _, future in turn:
                future.cancel()
            raise
        for (_, _, future), result in zip(turn, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(self, turn: Sequence[Queued]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for names, args, _ in turn:
            pipe.evalsha(self._sha, len(names), *names, *args)
        return await pipe.execute(raise_on_error=False)
