"""Three workers behind one gateway, under the load real clients send (`python -m bench.run
--only workers` runs just this part).

Valkey, three workers and one gateway with default settings (`taskmux up --workers 3`),
driven by the default Python client (`AsyncTaskMuxClient`: an idempotency key on every
call, retries on UNAVAILABLE and hinted RESOURCE_EXHAUSTED), sending 8-text Embeds:

  steady  closed-loop callers back to back (the highest throughput this machine
          sustains) for `soak_s`, with Redis `INFO memory` used_memory sampled every
          second: the gateway keeps each keyed response for its idempotency TTL (60 s by
          default), so memory should rise for one TTL and then stay flat;
  burst   many callers at once, each making a few calls: each worker's share of the jobs
          (its counters hash), and the most any one worker held pending (pulled, not
          answered) at once, sampled every 50 ms against the work outstanding.

The steady run goes first, so the burst's idempotency records cannot expire inside it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import grpc
import redis
from taskmux_client import AsyncTaskMuxClient, Attempt

from bench.system import running_system, valkey
from gateway.settings import GatewaySettings
from router import keys
from taskmux.loadtest.texts import TextGenerator

WORKERS = 3
TEXTS_PER_CALL = 8
WORDS_PER_TEXT = 8  # per text: about 12 tokens
BURST_CALLERS = 240
BURST_CALLS = 10  # per caller
STEADY_CALLERS = 64
SOAK_S = 150.0
HELD_SAMPLE_S = 0.05
MEMORY_SAMPLE_S = 1.0
COUNTERS_FLUSH_S = 0.6  # a little over the workers' flush interval of the counters hash
PLATEAU_RATIO = 0.15  # issue 11 item 3: second half's growth under 15% of the first's
STREAM = keys.task_stream("embed")


@dataclass
class Calls:
    """What a set of callers saw: calls answered, retried attempts by code, failures."""

    ok: int = 0
    seconds: float = 0.0
    retried: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)

    def on_attempt(self, attempt: Attempt) -> None:
        if attempt.code != grpc.StatusCode.OK and attempt.retry_in_s is not None:
            self.retried[attempt.code.name] += 1


async def _call(target: str, callers: int, calls: int | None, until: float | None) -> Calls:
    """`callers` callers back to back, each making `calls` calls or calling until `until`
    (time.monotonic), through one default client."""
    texts = [TextGenerator(seed=11).text(WORDS_PER_TEXT) for _ in range(1024)]
    seen = Calls()
    started = time.monotonic()
    async with AsyncTaskMuxClient(target, on_attempt=seen.on_attempt) as client:

        async def caller(i: int) -> None:
            n = 0
            while (calls is None or n < calls) and (until is None or time.monotonic() < until):
                first = (i * 131 + n * TEXTS_PER_CALL) % (len(texts) - TEXTS_PER_CALL)
                try:
                    await client.embed(texts[first : first + TEXTS_PER_CALL])
                    seen.ok += 1
                except grpc.RpcError as err:  # counted and reported, never hidden
                    seen.failed[err.code().name] += 1
                n += 1

        await asyncio.gather(*(caller(i) for i in range(callers)))
    seen.seconds = time.monotonic() - started
    return seen


class Sampler:
    """Calls `sample(redis)` every `every_s` on a thread of its own, while in a `with`."""

    def __init__(self, url: str, every_s: float) -> None:
        self._redis = redis.Redis.from_url(url)
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def sample(self, r: redis.Redis) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.sample(self._redis)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample(self._redis)
        self._redis.close()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._every_s):
                self.sample(self._redis)
        except BaseException as err:  # re-raised in the bench's thread
            self.error = err


class HeldSampler(Sampler):
    """The embed stream's length (queued plus in-flight jobs) and what each worker holds."""

    def __init__(self, url: str) -> None:
        super().__init__(url, HELD_SAMPLE_S)
        self.samples: list[tuple[int, dict[str, int]]] = []

    def sample(self, r: redis.Redis) -> None:
        pipe = r.pipeline(transaction=True)
        pipe.xlen(STREAM)
        pipe.xpending(STREAM, keys.WORKER_GROUP)
        length, pending = pipe.execute()
        held = {c["name"].decode(): int(c["pending"]) for c in pending.get("consumers") or []}
        self.samples.append((int(length), held))


class MemorySampler(Sampler):
    """(seconds since the first sample, used_memory in bytes)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, MEMORY_SAMPLE_S)
        self.samples: list[tuple[float, int]] = []
        self._t0 = time.monotonic()

    def sample(self, r: redis.Redis) -> None:
        used = int(r.info("memory")["used_memory"])
        self.samples.append((time.monotonic() - self._t0, used))


@dataclass(frozen=True)
class Burst:
    """Many callers at once: how the jobs spread over the workers."""

    callers: int
    calls_per_caller: int
    ok: int
    seconds: float
    errors: dict[str, int]
    retries: dict[str, int]
    jobs: dict[str, int]  # per worker id, from its counters hash
    shares: dict[str, float]
    most_held: int  # the most jobs one worker held pending at once
    most_outstanding: int  # the longest the embed stream got (queued plus in flight)
    worst_held_fraction: float  # max over busy samples of (most held by one) / outstanding
    busy_samples: int  # samples with at least callers / 2 jobs outstanding
    samples: int


@dataclass(frozen=True)
class Steady:
    """A steady keyed load: throughput and what it leaves in Redis."""

    callers: int
    seconds: float
    ok: int
    calls_per_s: float
    errors: dict[str, int]
    retries: dict[str, int]
    idempotency_ttl_s: int
    used_memory_start: int
    used_memory_mid: int
    used_memory_end: int
    growth_first_half: int
    growth_second_half: int
    growth_ratio: float | None  # second half / first half; None if the first did not grow
    second_half_min: int  # used_memory's range over the second half: how much it swings
    second_half_max: int  # about its plateau, which end minus mid alone does not show
    idempotency_records_end: int
    bytes_per_record: float | None  # (end - start) / records live at the end
    memory: list[tuple[float, int]]  # (s, used_memory) every MEMORY_SAMPLE_S

    @property
    def plateau(self) -> bool:
        """The issue's criterion: the second half grew under 15% of the first half's growth."""
        return self.growth_ratio is not None and self.growth_ratio < PLATEAU_RATIO


@dataclass(frozen=True)
class WorkersRun:
    """One run of this part: when, where, and its two measurements."""

    when: str
    nproc: int
    machine: str
    workers: list[str]
    burst: Burst
    steady: Steady

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["steady"]["plateau"] = self.steady.plateau
        return data


def steady(target: str, url: str, callers: int, soak_s: float, ttl_s: int) -> Steady:
    """`callers` callers back to back for `soak_s`, with used_memory sampled every second."""
    with MemorySampler(url) as memory:
        calls = asyncio.run(_call(target, callers, None, time.monotonic() + soak_s))
    series = memory.samples
    start, end = series[0][1], series[-1][1]
    mid = next(m for t, m in series if t >= series[-1][0] / 2)
    first, second = mid - start, end - mid
    second_half = [m for t, m in series if t >= series[-1][0] / 2]
    with redis.Redis.from_url(url) as r:
        records = sum(1 for _ in r.scan_iter(f"{keys.PREFIX}idem:*", count=1000))
    return Steady(
        callers=callers,
        seconds=calls.seconds,
        ok=calls.ok,
        calls_per_s=calls.ok / calls.seconds,
        errors=dict(calls.failed),
        retries=dict(calls.retried),
        idempotency_ttl_s=ttl_s,
        used_memory_start=start,
        used_memory_mid=mid,
        used_memory_end=end,
        growth_first_half=first,
        growth_second_half=second,
        growth_ratio=second / first if first > 0 else None,
        second_half_min=min(second_half),
        second_half_max=max(second_half),
        idempotency_records_end=records,
        bytes_per_record=(end - start) / records if records else None,
        memory=series,
    )


def burst(target: str, url: str, workers: list[str], callers: int, calls: int) -> Burst:
    """`callers` callers at once, `calls` calls each; shares from the workers' counters."""
    with redis.Redis.from_url(url) as r:

        def jobs() -> dict[str, int]:
            return {w: int(r.hget(keys.worker_stats(w), "jobs") or 0) for w in workers}

        before = _settled(jobs)  # the steady run's last jobs counted first
        with HeldSampler(url) as held:
            seen = asyncio.run(_call(target, callers, calls, None))
        after = _settled(jobs)
        done = {w: n - before[w] for w, n in after.items()}
    total = sum(done.values())
    busy = [(n, h) for n, h in held.samples if n >= callers // 2]
    return Burst(
        callers=callers,
        calls_per_caller=calls,
        ok=seen.ok,
        seconds=seen.seconds,
        errors=dict(seen.failed),
        retries=dict(seen.retried),
        jobs=done,
        shares={w: n / total if total else 0.0 for w, n in done.items()},
        most_held=max((max(h.values(), default=0) for _, h in held.samples), default=0),
        most_outstanding=max((n for n, _ in held.samples), default=0),
        worst_held_fraction=max((max(h.values(), default=0) / n for n, h in busy), default=0.0),
        busy_samples=len(busy),
        samples=len(held.samples),
    )


def _settled(read: Callable[[], dict[str, int]], timeout_s: float = 10) -> dict[str, int]:
    """The workers' counters once two reads a flush interval apart agree (workers flush
    them twice a second, off the reply path)."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(COUNTERS_FLUSH_S)
        now = read()
        if now == last:
            break
        last = now
    return last


def _wait_for_workers(url: str, count: int, timeout_s: float = 180) -> list[str]:
    """The ids of `count` live workers, once that many have published their catalogs."""
    deadline = time.monotonic() + timeout_s
    with redis.Redis.from_url(url, decode_responses=True) as r:
        while time.monotonic() < deadline:
            ids = sorted(r.smembers(keys.WORKERS_KEY))
            if len(ids) >= count and all(r.exists(keys.worker_catalog(w)) for w in ids):
                return ids
            time.sleep(0.2)
    raise RuntimeError(f"{count} workers not up after {timeout_s}s; see the log")


@contextmanager
def _system(repo: Path, log: Path) -> Iterator[tuple[str, str, list[str]]]:
    """(target, Redis URL, worker ids) of Valkey, WORKERS workers and one gateway."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="taskmux-bench-")))
        url = stack.enter_context(valkey(tmp / "valkey"))
        env = {"TASKMUX_REDIS_URL": url}
        target, _ = stack.enter_context(running_system(repo, log, env=env, workers=WORKERS))
        yield target, url, _wait_for_workers(url, WORKERS)


def run_workers(
    repo: Path,
    logs: Path,
    *,
    soak_s: float = SOAK_S,
    steady_callers: int = STEADY_CALLERS,
    burst_callers: int = BURST_CALLERS,
    burst_calls: int = BURST_CALLS,
) -> WorkersRun:
    """Start the system, run the steady load, then the burst."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    # The gateways' own setting: `taskmux up` passes them this environment.
    ttl_s = GatewaySettings.from_env(os.environ).idempotency_ttl_s
    with _system(repo, logs / "workers.log") as (target, url, workers):
        print(f"bench: workers, steady load for {soak_s:g} s", file=sys.stderr)
        quiet = steady(target, url, steady_callers, soak_s, ttl_s)
        print(f"bench: workers, burst of {burst_callers} callers", file=sys.stderr)
        spread = burst(target, url, workers, burst_callers, burst_calls)
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return WorkersRun(when, nproc or 0, platform.machine(), workers, spread, quiet)
