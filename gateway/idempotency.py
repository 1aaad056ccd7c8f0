"""Idempotency keys: one computation per (RPC, key, request) within a TTL, across gateways.

The state of a key lives in Redis (`router.keys.idempotency_key`), so every gateway
replica sees it:

    absent ──SET NX PX (pending)──► pending ──store (done, TTL idempotency_ttl_s)──► done
                                       └── failure or cancel: compare-and-delete ──► absent

Keys are scoped by tenant: the record's name hashes the tenant with the key.

A call with a key first tries to claim it. A unary call without a tenant (no API keys)
claims it inside the enqueue script, which queues the job only if the claim succeeds:
one round trip for both (a tenant's charge must come between the claim and the enqueue,
so its claim is a round trip of its own). If another call holds it, this one reads the
record: done with the same request hash → that result, not computed again; pending with
the same hash → poll until it is done (or gone: then claim it) or this call's deadline
passes; a record with a different hash → INVALID_ARGUMENT, because the client reused the
key for another request. Only successes are kept, so a retry after a failure computes
again. A pending claim is a short lease (`IDEMPOTENCY_LEASE_MS`) that its gateway renews
while the call computes (every call that holds a `Claim` in `async with`: unary calls
through `run`, Analyze directly), so a crashed gateway's claim lapses within seconds, not
at the end of the call's deadline or the TTL. The done record is written just after the
call has answered (its claim still pending meanwhile, so a duplicate then waits for it),
which keeps a round trip off the reply.

With a payload key (`router.payload`) the stored result is sealed, bound to the record's
Redis key, and the request hash is an HMAC, so a record reveals neither the response nor
(by hashing guesses) the request. A stored result this gateway cannot open (sealed with
a key it no longer has) is logged and computed again, not served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import Message
from redis.exceptions import RedisError

from gateway.errors import DeadlineExceeded, InvalidArgument, redis_errors
from router import keys, scripts
from router.messages import IdempotencyRecord, MalformedMessage, UnreadablePayload
from router.payload import PayloadCipher, request_digest
from router.turns import ScriptTurns
from taskmux.backoff import Backoff

log = logging.getLogger(__name__)

POLL_START_S = 0.005
POLL_MAX_S = 0.1


def request_hash(request: Message, cipher: PayloadCipher | None = None) -> bytes:
    """SHA-256 of the request without its metadata fields (request_id, idempotency_key),
    or its HMAC under the payload key when `cipher` is given."""
    return request_digest(cipher, _content(request))


def _content(request: Message) -> bytes:
    content = type(request)()
    content.CopyFrom(request)
    for name in ("request_id", "idempotency_key"):
        content.ClearField(name)
    return (
        content.DESCRIPTOR.full_name.encode()
        + b"\0"
        + content.SerializeToString(deterministic=True)
    )


class KeyTaken(Exception):
    """The enqueue did not claim the key (nor queue the job): another call holds it."""


@dataclass(frozen=True)
class ClaimOnEnqueue:
    """A pending claim the enqueue script writes before it queues the job (SET NX PX of
    `value` under `name` for `lease_ms`), refusing with `KeyTaken` if the key is held."""

    name: str
    value: bytes
    lease_ms: int
    wanted: bytes  # this request's hash
    same: frozenset[bytes]  # the hashes a record of this very request may carry


class Claim:
    """A call's hold on its key: `cached` is a stored result, or None and this call computes.

    Held in `async with`, a pending claim is renewed in short leases until the block
    ends. A result handed to `keep` is stored after the block, off the call's path: the
    caller has its answer one round trip sooner, and the claim stays pending (its lease
    runs) until the record is done, so a duplicate meanwhile waits for the stored result.
    Without a result (the call failed or was cancelled) the claim is released at the end
    of the block.
    """

    def __init__(
        self,
        store: Callable[[bytes], Awaitable[bool]] | None = None,
        release: Callable[[], Awaitable[None]] | None = None,
        cached: bytes | None = None,
        renew: Callable[[], Awaitable[None]] | None = None,
        settle: Callable[[Coroutine[Any, Any, None]], None] | None = None,
    ) -> None:
        self.cached = cached
        self._renew = renew
        self._store = store
        self._release = release
        self._settle = settle  # runs the store after the call, under its owner
        self._body: bytes | None = None
        # A timer, not a task per call: most calls end long before their first renewal.
        self._timer: asyncio.TimerHandle | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._ended = False

    def disown(self) -> None:
        """The key turned out to be another call's: end the block without touching it."""
        self._release = None

    def keep(self, body: bytes) -> None:
        """Store `body` for later calls with the same key and request, once the block ends."""
        self._body = body

    async def __aenter__(self) -> Claim:
        if self._renew is not None:
            self._arm()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        if self._release is None:  # no key, or a stored result served
            return
        if self._body is not None and self._store is not None and self._settle is not None:
            self._settle(self._stored(self._store, self._release, self._body))
            return
        release, self._release = self._release, None
        # A renewal in flight is let finish (within the socket timeout), not cancelled:
        # cancelling one inside redis-py could leave it running: seen as calls answered
        # only at their client deadline under a soak.
        if self._renewing is not None:
            await asyncio.shield(self._renewing)
        with contextlib.suppress(RedisError):  # if not, it lapses with the call
            await asyncio.shield(release())

    async def _stored(
        self,
        store: Callable[[bytes], Awaitable[bool]],
        release: Callable[[], Awaitable[None]],
        body: bytes,
    ) -> None:
        """Store the result; if Redis refuses, release the claim so a retry computes."""
        if self._renewing is not None:
            await self._renewing
        if not await store(body):
            with contextlib.suppress(RedisError):  # if not, it lapses with its lease
                await release()

    def _arm(self) -> None:
        """Renew the lease a third of the way through it: if this gateway dies, the claim
        lapses within one lease and a retry elsewhere can take the key."""
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(keys.IDEMPOTENCY_LEASE_MS / 3000, self._renew_now)

    def _renew_now(self) -> None:
        self._timer = None
        self._renewing = asyncio.get_running_loop().create_task(self._renew_once())

    async def _renew_once(self) -> None:
        assert self._renew is not None
        with contextlib.suppress(RedisError):
            await self._renew()
        if not self._ended:
            self._arm()


NO_KEY = Claim()


class Idempotency:
    """Claims, waits on and stores idempotency records in Redis."""

    def __init__(
        self, redis: aioredis.Redis, *, ttl_s: int, cipher: PayloadCipher | None = None
    ) -> None:
        self._redis = redis
        self._cipher = cipher
        self._ttl_ms = ttl_s * 1000
        self._release_script = redis.register_script(scripts.IDEMPOTENCY_RELEASE)
        # Stores are many (one per keyed call, just after its answer) and come in bursts
        # (the callers one batch of replies woke): one pipeline per event-loop turn.
        self._stores = ScriptTurns(redis, scripts.IDEMPOTENCY_STORE)
        self._renew_script = redis.register_script(scripts.IDEMPOTENCY_RENEW)
        # Stores of results already answered: each ends within the socket timeout.
        self._settling: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Idempotency:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Let the stores of calls already answered finish, so their records are done."""
        if self._settling:
            await asyncio.gather(*self._settling)

    async def run(
        self,
        scope: str,
        kind: str,
        key: str,
        request: Message,
        timeout_s: float,
        compute: Callable[[float, ClaimOnEnqueue | None], Awaitable[bytes]],
        *,
        claim_on_enqueue: bool = False,
    ) -> bytes:
        """`compute(time left, claim)`'s result, computed once per key and request.

        With `claim_on_enqueue` (nothing in `compute` must happen before the claim), the
        first try at the key is made by the enqueue itself (`ClaimOnEnqueue`): one round
        trip for both. Only if another call holds the key does this call wait for it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if key and claim_on_enqueue:
            attempt = self._attempt(scope, kind, key, request)
            claim = self._held(attempt)
            async with claim:
                try:
                    body = await compute(timeout_s, attempt)
                except KeyTaken:  # another call's: nothing was queued, nothing is ours
                    claim.disown()
                else:
                    claim.keep(body)
                    return body
        claim = await self.claim(scope, kind, key, request, max(deadline - loop.time(), 0.001))
        if claim.cached is not None:
            return claim.cached
        async with claim:
            body = await compute(max(deadline - loop.time(), 0.001), None)
            claim.keep(body)
        return body

    async def claim(
        self, scope: str, kind: str, key: str, request: Message, timeout_s: float
    ) -> Claim:
        """Hold `key` for this call, or return the result stored under it; NO_KEY without one.

        `scope` is the caller's tenant ("" without authentication): the same key sent by
        two tenants names two records, so no tenant can read or block another's results.
        """
        if not key:
            return NO_KEY
        attempt = self._attempt(scope, kind, key, request)
        name = attempt.name
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        poll = Backoff(POLL_START_S, POLL_MAX_S)
        with redis_errors("the idempotency store"):
            while True:
                if await self._redis.set(name, attempt.value, nx=True, px=attempt.lease_ms):
                    return self._held(attempt)
                raw = await self._redis.get(name)
                if raw is not None:
                    record = _decode(raw)
                    if record is None or record.request_hash not in attempt.same:
                        raise InvalidArgument(
                            "idempotency_key was already used with a different request "
                            "(within the idempotency TTL): send a new key for each distinct "
                            "request"
                        )
                    if record.body is not None:
                        return self._cached(name, record)
                wait_s = poll.next_s()
                if loop.time() + wait_s >= deadline:
                    raise DeadlineExceeded(
                        "an identical request with this idempotency_key is still running "
                        f"and did not finish within {timeout_s:.3f}s; retry with the same key"
                    )
                await asyncio.sleep(wait_s)

    def _attempt(self, scope: str, kind: str, key: str, request: Message) -> ClaimOnEnqueue:
        """What claiming `key` for this call writes, and the hashes that count as its
        request (one under another loaded key, before a rotation, is the same request)."""
        content = _content(request)
        wanted = request_digest(self._cipher, content)
        return ClaimOnEnqueue(
            name=keys.idempotency_key(kind, scope, key),
            value=IdempotencyRecord(wanted, owner=os.urandom(16)).encode(),
            lease_ms=keys.IDEMPOTENCY_LEASE_MS,
            wanted=wanted,
            same=self._cipher.digests(content) if self._cipher else frozenset((wanted,)),
        )

    def _held(self, attempt: ClaimOnEnqueue) -> Claim:
        name, mine, wanted = attempt.name, attempt.value, attempt.wanted
        return Claim(
            store=lambda body: self._store(name, wanted, body),
            release=lambda: self._release(name, mine),
            renew=lambda: self._renew(name, mine),
            settle=self._settle_later,
        )

    def _settle_later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._settling.add(task)
        task.add_done_callback(_settled)
        task.add_done_callback(self._settling.discard)

    def _cached(self, name: str, record: IdempotencyRecord) -> Claim:
        """The stored result; if it cannot be opened, a claim that computes without storing."""
        try:
            return Claim(cached=record.result(self._cipher, name))
        except UnreadablePayload as err:
            log.warning("computing %s again: %s", name, err)
            return Claim()

    async def _store(self, name: str, wanted: bytes, body: bytes) -> bool:
        """True once stored; a failure only means a later duplicate computes again."""
        record = IdempotencyRecord(wanted, body=body).encode(self._cipher, name)
        try:
            await self._stores.call([name], [wanted, record, self._ttl_ms])
        except RedisError as err:
            log.warning("could not store the result of %s: %s", name, err)
            return False
        return True

    async def _renew(self, name: str, mine: bytes) -> None:
        await self._renew_script(keys=[name], args=[mine, keys.IDEMPOTENCY_LEASE_MS])

    async def _release(self, name: str, mine: bytes) -> None:
        await self._release_script(keys=[name], args=[mine])


def _settled(task: asyncio.Task[None]) -> None:
    """Log a store that failed in an unexpected way: nobody awaits it."""
    if not task.cancelled() and (err := task.exception()) is not None:
        log.error("storing an idempotent result failed", exc_info=err)


def _decode(raw: bytes | str) -> IdempotencyRecord | None:
    try:
        return IdempotencyRecord.decode(raw if isinstance(raw, bytes) else raw.encode())
    except MalformedMessage:
        return None
