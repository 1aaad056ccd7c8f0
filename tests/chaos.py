"""Load through a fault: every logical call retried to success, every attempt counted.

`drive` sends logical calls with the client's own retries off and retries here instead,
so each attempt is seen. An attempt that ends UNAVAILABLE, RESOURCE_EXHAUSTED or
DEADLINE_EXCEEDED is retried with the same request_id and idempotency_key, with
jittered exponential backoff (at least the server's hint), until CALL_BUDGET_S is spent;
any other error, or a spent budget, fails the call. `Report.check` then states what a
scenario may cost its callers: no attempt may hang until its deadline, at most a stated
share of attempts may be retryable errors, and calls started once the system has
recovered (plus a settling time) succeed on their first attempt.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc
import numpy as np
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_client.errors import (
    DeadlineExceededError,
    ResourceExhaustedError,
    TaskMuxError,
    UnavailableError,
)

from tests.harness import Background

T = TypeVar("T")

# Every logical call must succeed within this, however many attempts it takes.
CALL_BUDGET_S = 60.0
# One attempt's deadline. An attempt stuck behind a lost job ends here and is retried;
# well above an attempt's normal latency under the chaos load on a busy CI machine.
ATTEMPT_TIMEOUT_S = 15.0
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
RETRYABLE = (UnavailableError, ResourceExhaustedError, DeadlineExceededError)

# One attempt of logical call number `index`: (index, request_id, idempotency_key, timeout_s).
Attempt = Callable[[int, str, str, float], Awaitable[T]]


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt as the caller saw it."""

    started: float  # time.monotonic()
    ended: float
    code: grpc.StatusCode  # OK when it succeeded


@dataclass
class Call(Generic[T]):
    """One logical call: its attempts and its final result or error."""

    index: int
    attempts: list[AttemptRecord] = field(default_factory=list)
    result: T | None = None
    error: str = ""  # set when the call failed for good

    @property
    def started(self) -> float:
        return self.attempts[0].started


async def _one(index: int, attempt: Attempt[T], rng: random.Random) -> Call[T]:
    call: Call[T] = Call(index)
    request_id, key = uuid.uuid4().hex, uuid.uuid4().hex
    budget_ends = time.monotonic() + CALL_BUDGET_S
    while True:
        started = time.monotonic()
        timeout_s = min(ATTEMPT_TIMEOUT_S, max(budget_ends - started, 0.001))
        try:
            call.result = await attempt(index, request_id, key, timeout_s)
        except RETRYABLE as err:
            call.attempts.append(AttemptRecord(started, time.monotonic(), err.status))
            bound = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2 ** (len(call.attempts) - 1))
            delay = max(rng.uniform(0, bound), err.retry_after_s or 0.0)
            if time.monotonic() + delay >= budget_ends:
                call.error = f"no success within {CALL_BUDGET_S:.0f}s: last {err!r}"[:300]
                return call
            await asyncio.sleep(delay)
            continue
        except TaskMuxError as err:
            call.attempts.append(AttemptRecord(started, time.monotonic(), err.status))
            call.error = repr(err)[:300]
            return call
        except Exception as err:  # anything else is a failed call, reported with the rest
            call.attempts.append(AttemptRecord(started, time.monotonic(), grpc.StatusCode.UNKNOWN))
            call.error = repr(err)[:300]
            return call
        call.attempts.append(AttemptRecord(started, time.monotonic(), grpc.StatusCode.OK))
        return call


async def drive(
    attempt: Attempt[T], calls: int, concurrency: int, first_index: int = 0
) -> list[Call[T]]:
    """Make `calls` logical calls, `concurrency` at a time; each retried as described above."""
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(0)

    async def gated(index: int) -> Call[T]:
        async with gate:
            return await _one(index, attempt, rng)

    return list(await asyncio.gather(*(gated(first_index + i) for i in range(calls))))


@dataclass
class Report(Generic[T]):
    """What the callers of one scenario saw, and the bounds it must keep."""

    name: str
    calls: list[Call[T]]
    recovered_at: float | None  # time.monotonic() when the system was whole again

    @property
    def attempts(self) -> int:
        return sum(len(c.attempts) for c in self.calls)

    @property
    def retryable(self) -> int:
        return sum(a.code in _RETRYABLE_CODES for c in self.calls for a in c.attempts)

    def line(self) -> str:
        codes: dict[str, int] = {}
        for c in self.calls:
            for a in c.attempts:
                codes[a.code.name] = codes.get(a.code.name, 0) + 1
        failed = sum(bool(c.error) for c in self.calls)
        return (
            f"chaos[{self.name}]: calls={len(self.calls)} failed={failed} "
            f"attempts={self.attempts} by code={codes} "
            f"max attempts of one call={max((len(c.attempts) for c in self.calls), default=0)} "
            f"slowest attempt={max((a.ended - a.started for c in self.calls for a in c.attempts), default=0):.1f}s"
        )

    def check(
        self,
        *,
        max_retryable_fraction: float,
        settle_s: float,
        correct: Callable[[Call[T]], bool],
    ) -> None:
        """Fail with every broken bound at once (see `problems`)."""
        problems = self.problems(
            max_retryable_fraction=max_retryable_fraction, settle_s=settle_s, correct=correct
        )
        assert not problems, f"{self.line()}\n" + "\n".join(problems)

    def problems(
        self,
        *,
        max_retryable_fraction: float,
        settle_s: float,
        correct: Callable[[Call[T]], bool],
    ) -> list[str]:
        """Every broken bound: a failed or wrong call; an attempt that ran into its
        deadline; more than `max_retryable_fraction` of attempts retryable errors; no
        recovery; or a retried call that started `settle_s` or more after recovery."""
        problems: list[str] = []
        failed = [c for c in self.calls if c.error]
        if failed:
            problems.append(f"{len(failed)} calls failed, e.g. {[c.error for c in failed[:3]]}")
        wrong = [c.index for c in self.calls if not c.error and not correct(c)]
        if wrong:
            problems.append(f"{len(wrong)} calls got a wrong result, e.g. calls {wrong[:5]}")
        # An attempt that got nothing for ATTEMPT_TIMEOUT_S (many times an attempt's normal
        # latency) was a call the system had lost, whatever the fault: never acceptable.
        hung = sum(
            a.code == grpc.StatusCode.DEADLINE_EXCEEDED for c in self.calls for a in c.attempts
        )
        if hung:
            problems.append(f"{hung} attempts got no answer within {ATTEMPT_TIMEOUT_S:.0f}s")
        fraction = self.retryable / max(self.attempts, 1)
        if fraction > max_retryable_fraction:
            problems.append(
                f"{self.retryable}/{self.attempts} attempts ({fraction:.1%}) were retryable "
                f"errors; at most {max_retryable_fraction:.0%} allowed"
            )
        if self.recovered_at is None:
            problems.append("the fault injector never reported recovery")
        else:
            settled = self.recovered_at + settle_s
            late = [c for c in self.calls if c.started >= settled and len(c.attempts) > 1]
            if late:
                problems.append(
                    f"{len(late)} calls started over {settle_s:.0f}s after recovery needed "
                    f"retries, e.g. {[[a.code.name for a in c.attempts] for c in late[:3]]}"
                )
        return problems


_RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


class Recovery:
    """Set by a fault injector once every part it broke serves again."""

    def __init__(self) -> None:
        self.at: float | None = None

    def mark(self) -> None:
        self.at = time.monotonic()


class FaultInjector(Background):
    """Runs `fault(done, recovery)` in a thread for the body of a `with`; on exit sets
    `done`, joins the thread and re-raises whatever it raised (see `Background`)."""

    def __init__(self, fault: Callable[[threading.Event, Recovery], None]) -> None:
        self.recovery = Recovery()
        super().__init__(lambda done: fault(done, self.recovery), name="fault-injector")


@dataclass(frozen=True)
class FaultRun(Generic[T]):
    """What a load driven through a fault saw: every call, when the fault's parts served
    again (None if never), and how long the load under the fault took."""

    calls: list[Call[T]]
    recovered_at: float | None
    elapsed_s: float


def run_through_fault(
    fault: Callable[[threading.Event, Recovery], None],
    load: Callable[[int, int], Awaitable[list[Call[T]]]],
    *,
    requests: int,
    probes: int,
    settle_s: float,
) -> FaultRun[T]:
    """`load(requests, 0)` while `fault` runs; once it has recovered and `settle_s` has
    passed, `load(probes, requests)` more, which must then succeed first time."""
    started = time.monotonic()
    with FaultInjector(fault) as injector:
        calls = asyncio.run(load(requests, 0))
    elapsed_s = time.monotonic() - started
    recovered_at = injector.recovery.at
    if recovered_at is not None:
        time.sleep(max(0.0, recovered_at + settle_s - time.monotonic()))
        calls += asyncio.run(load(probes, requests))
    return FaultRun(calls, recovered_at, elapsed_s)


def matches_embedding(
    expected: dict[str, np.ndarray], texts: list[str]
) -> Callable[[Call[pb.EmbedResponse]], bool]:
    """A check that call i's embedding is the one computed directly for texts[i % n]."""

    def correct(call: Call[pb.EmbedResponse]) -> bool:
        assert call.result is not None
        got = np.array(call.result.embeddings[0].values, dtype=np.float32)
        return float(got @ expected[texts[call.index % len(texts)]]) >= 0.999

    return correct
