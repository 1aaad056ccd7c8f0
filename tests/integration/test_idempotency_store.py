"""`Idempotency` in this event loop on a real Valkey: the done record is written after the
call has its answer (the claim stays pending until then, so a duplicate waits for it),
closing waits for stores in flight, a long call's claim is renewed, and a claim left to
the enqueue falls back to waiting when the key is another call's."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from taskmux_api.v1 import taskmux_pb2 as pb

from gateway.idempotency import ClaimOnEnqueue, Idempotency, KeyTaken
from router import keys
from router.messages import IdempotencyRecord

BODY = b"the computed answer"


def _request() -> tuple[str, pb.EmbedRequest]:
    key = uuid.uuid4().hex
    return key, pb.EmbedRequest(texts=["stored after the answer"], idempotency_key=key)


async def _record(aredis: aioredis.Redis, key: str) -> IdempotencyRecord | None:
    raw = await aredis.get(keys.idempotency_key("embed", "", key))
    assert raw is None or isinstance(raw, bytes)
    return None if raw is None else IdempotencyRecord.decode(raw)


async def test_a_duplicate_right_after_the_answer_gets_the_stored_result(
    aredis: aioredis.Redis,
) -> None:
    key, request = _request()
    computed = 0

    async def compute(timeout_s: float, claim: ClaimOnEnqueue | None) -> bytes:
        nonlocal computed
        computed += 1
        return BODY

    async with Idempotency(aredis, ttl_s=60) as idempotency:
        body = await idempotency.run("", "embed", key, request, 5, compute)
        assert body == BODY
        # Answered: the record is pending or done, never absent, so nobody computes again.
        assert await _record(aredis, key) is not None
        again = await idempotency.run("", "embed", key, request, 5, compute)
    assert again == BODY
    assert computed == 1


async def test_closing_waits_for_the_stores_of_answered_calls(aredis: aioredis.Redis) -> None:
    key, request = _request()

    async def compute(timeout_s: float, claim: ClaimOnEnqueue | None) -> bytes:
        return BODY

    async with Idempotency(aredis, ttl_s=60) as idempotency:
        await idempotency.run("", "embed", key, request, 5, compute)
    record = await _record(aredis, key)
    assert record is not None and record.body is not None
    assert record.result(None, keys.idempotency_key("embed", "", key)) == BODY
    assert 0 < await aredis.ttl(keys.idempotency_key("embed", "", key)) <= 60


async def test_a_failed_call_releases_its_claim_before_it_answers(
    aredis: aioredis.Redis,
) -> None:
    key, request = _request()

    async def compute(timeout_s: float, claim: ClaimOnEnqueue | None) -> bytes:
        raise RuntimeError("the worker said no")

    async with Idempotency(aredis, ttl_s=60) as idempotency:
        with pytest.raises(RuntimeError):
            await idempotency.run("", "embed", key, request, 5, compute)
        assert await _record(aredis, key) is None


async def test_a_long_call_keeps_renewing_its_claim(aredis: aioredis.Redis) -> None:
    key, request = _request()
    name = keys.idempotency_key("embed", "", key)
    lease_s = keys.IDEMPOTENCY_LEASE_MS / 1000
    seen: list[int] = []

    async def compute(timeout_s: float, claim: ClaimOnEnqueue | None) -> bytes:
        # Half a lease in: past the first renewal, due a third of a lease in.
        await asyncio.sleep(lease_s / 2)
        seen.append(await aredis.pttl(name))
        return BODY

    async with Idempotency(aredis, ttl_s=60) as idempotency:
        await idempotency.run("", "embed", key, request, 10, compute)
    # Never renewed, the claim would have half a lease left at most.
    assert seen and seen[0] > keys.IDEMPOTENCY_LEASE_MS * 0.6


async def test_a_key_taken_at_enqueue_waits_for_the_call_that_holds_it(
    aredis: aioredis.Redis,
) -> None:
    key, request = _request()
    offered: list[ClaimOnEnqueue | None] = []

    async def compute(timeout_s: float, claim: ClaimOnEnqueue | None) -> bytes:
        offered.append(claim)
        if claim is not None and await aredis.exists(claim.name):
            raise KeyTaken  # what the enqueue script answers for a held key
        return b"computed again"

    async with Idempotency(aredis, ttl_s=60) as idempotency:
        holder = await idempotency.claim("", "embed", key, request, 5)

        async def answer_first() -> None:
            async with holder:
                await asyncio.sleep(0.05)
                holder.keep(BODY)

        first = asyncio.create_task(answer_first())
        body = await idempotency.run("", "embed", key, request, 5, compute, claim_on_enqueue=True)
        await first
    assert body == BODY
    (claim,) = offered  # tried once, at the enqueue; then served the stored result
    assert claim is not None and claim.name == keys.idempotency_key("embed", "", key)
