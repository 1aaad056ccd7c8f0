"""ScriptTurns (router/turns.py) on a real Valkey: the calls of one event-loop turn go out
in one pipeline, yet each is its own script run with its own reply or error; a flushed
script cache is reloaded; an unreachable Redis fails every caller of the turn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from router.turns import ScriptTurns
from taskmux.local import free_port

# Sets KEYS[1] to ARGV[1] and answers it; a call whose ARGV[1] is "boom" fails alone.
SET_AND_ECHO = """
if ARGV[1] == 'boom' then return redis.error_reply('ERR boom') end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""


class CountingPipelines:
    """The real client, counting the pipelines taken from it."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.pipelines = 0
        self._pipeline = redis.pipeline

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            self.pipelines += 1
            return self._pipeline(*args, **kwargs)

        redis.pipeline = pipeline  # type: ignore[method-assign]


async def test_one_turns_calls_share_one_pipeline_each_with_its_own_reply(
    aredis: aioredis.Redis,
) -> None:
    await aredis.script_load(SET_AND_ECHO)  # else the first turn resends after NOSCRIPT
    counting = CountingPipelines(aredis)
    turns = ScriptTurns(aredis, SET_AND_ECHO)
    futures = [turns.call([f"turns:{i}"], [f"v{i}"]) for i in range(20)]
    assert await asyncio.gather(*futures) == [f"v{i}".encode() for i in range(20)]
    assert counting.pipelines == 1
    assert await aredis.mget([f"turns:{i}" for i in range(20)]) == [
        f"v{i}".encode() for i in range(20)
    ]
    # A later turn is a pipeline of its own.
    assert await turns.call(["turns:later"], ["x"]) == b"x"
    assert counting.pipelines == 2


async def test_a_failing_call_fails_alone(aredis: aioredis.Redis) -> None:
    turns = ScriptTurns(aredis, SET_AND_ECHO)
    ok, bad = turns.call(["turns:ok"], ["fine"]), turns.call(["turns:bad"], ["boom"])
    outcomes = await asyncio.gather(ok, bad, return_exceptions=True)
    assert outcomes[0] == b"fine"
    assert isinstance(outcomes[1], ResponseError) and "boom" in str(outcomes[1])
    assert await aredis.exists("turns:bad") == 0


async def test_a_flushed_script_cache_is_reloaded(aredis: aioredis.Redis) -> None:
    turns = ScriptTurns(aredis, SET_AND_ECHO)
    await aredis.script_flush()
    futures = [turns.call([f"turns:flushed:{i}"], [str(i)]) for i in range(3)]
    assert await asyncio.gather(*futures) == [b"0", b"1", b"2"]


async def test_an_unreachable_redis_fails_every_caller_of_the_turn() -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    try:
        turns = ScriptTurns(client, SET_AND_ECHO)
        futures = [turns.call([f"turns:{i}"], ["x"]) for i in range(3)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await client.aclose()
    assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes


@pytest.mark.parametrize("cancelled", [0, 2])
async def test_a_caller_that_has_gone_is_skipped(aredis: aioredis.Redis, cancelled: int) -> None:
    turns = ScriptTurns(aredis, SET_AND_ECHO)
    futures = [turns.call([f"turns:gone:{i}"], [str(i)]) for i in range(4)]
    futures[cancelled].cancel()
    rest = [f for i, f in enumerate(futures) if i != cancelled]
    assert await asyncio.gather(*rest) == [str(i).encode() for i in range(4) if i != cancelled]
    # Its script still ran: the call was sent before it went.
    assert await aredis.get(f"turns:gone:{cancelled}") == str(cancelled).encode()
