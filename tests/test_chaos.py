"""Chaos under sustained load, every part a separate process: nothing may be lost.

Each scenario drives a few hundred Embed calls through the retrying client package while
a fault is injected, then prints a tally: sent, answered correctly, answered with a
retryable error, wrong (another request's result), lost (anything else). Correctness is
checked by content: every embedding is compared with a direct ONNX Runtime computation.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis

from router import keys
from taskmux.local import free_port
from taskmux.modelrepo.manifest import load_manifest
from taskmux_client import AsyncTaskMuxClient, RetryPolicy
from taskmux_client.errors import ResourceExhaustedError, UnavailableError
from tests.harness import Cluster, Proc, serving, wait_until
from workers.encoder import Encoder, l2_normalize

pytestmark = pytest.mark.integration

REQUESTS = 2500
FAULT_AFTER_S = 1.5
CONCURRENCY = 24
TEXTS = [
    f"chaos sentence number {i} about {w}" for i, w in enumerate(["cats", "markets", "rain"] * 40)
]


@dataclass
class Tally:
    """What the callers saw."""

    sent: int = 0
    correct: int = 0
    retryable: int = 0
    wrong: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)

    def line(self, name: str) -> str:
        return (
            f"chaos[{name}]: sent={self.sent} correct={self.correct} "
            f"retryable_error={self.retryable} wrong={self.wrong} lost={self.lost}"
        )


@pytest.fixture(scope="module")
def expected(model_repo: Path) -> dict[str, np.ndarray]:
    encoder = Encoder(model_repo, load_manifest(model_repo, verify=False).encoder)
    vectors = l2_normalize(encoder.encode(TEXTS)[0])
    return dict(zip(TEXTS, vectors, strict=True))


@pytest.fixture
def cluster(model_repo: Path, tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(model_repo, tmp_path) as c:
        yield c


async def _drive(target: str, expected: dict[str, np.ndarray]) -> Tally:
    tally = Tally()
    retry = RetryPolicy(max_attempts=15, initial_backoff_s=0.1, max_backoff_s=2.0)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with AsyncTaskMuxClient(target, timeout_s=60, retry=retry) as client:

        async def one(i: int) -> None:
            text = TEXTS[i % len(TEXTS)]
            async with gate:
                tally.sent += 1
                try:
                    response = await client.embed([text])
                except (UnavailableError, ResourceExhaustedError):
                    tally.retryable += 1
                    return
                except Exception as err:
                    tally.lost += 1
                    tally.lost_examples.append(repr(err)[:200])
                    return
            got = np.array(response.embeddings[0].values, dtype=np.float32)
            if float(got @ expected[text]) >= 0.999:
                tally.correct += 1
            else:
                tally.wrong += 1

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return tally


def _run(
    name: str,
    target: str,
    expected: dict[str, np.ndarray],
    fault: Callable[[threading.Event], None],
) -> Tally:
    done = threading.Event()
    injector = threading.Thread(target=fault, args=(done,))
    started = time.monotonic()
    injector.start()
    try:
        tally = asyncio.run(_drive(target, expected))
    finally:
        elapsed = time.monotonic() - started
        done.set()
        injector.join(60)
    print(tally.line(name) + f" in {elapsed:.1f}s")
    # The fault must land while calls are in flight, or the scenario proves nothing.
    assert elapsed > FAULT_AFTER_S + 1, f"the load was over after {elapsed:.1f}s"
    assert tally.sent == REQUESTS
    assert tally.lost == 0, tally.lost_examples[:5]
    assert tally.wrong == 0
    assert tally.correct + tally.retryable == REQUESTS
    return tally


# The worker registry has no TTL either: gateways remove dead workers' ids from it.
PERSISTENT = (keys.task_stream(""), keys.CATALOG_KEY, keys.WORKERS_KEY, keys.DEAD_LETTER_STREAM)


def _assert_bounded(cluster: Cluster) -> None:
    """Nothing grows without bound: queues drain, and every other key has a TTL."""
    r = redis.Redis.from_url(cluster.redis_url)
    streams = list(r.scan_iter(match=keys.task_stream("*")))
    wait_until(lambda: all(r.xlen(s) == 0 for s in streams), 30, "job streams drained")
    for stream in streams:
        assert r.xpending(stream, keys.WORKER_GROUP)["pending"] == 0, stream
    forever = [k.decode() for k in r.scan_iter() if r.ttl(k) == -1]
    assert all(k.startswith(PERSISTENT) for k in forever), forever


def _ready(cluster: Cluster, port: int | None = None, **gateway_env: str) -> str:
    _, target = cluster.start_gateway(port, **gateway_env)
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    return target


def test_kill_9_workers_every_few_seconds(
    cluster: Cluster, expected: dict[str, np.ndarray]
) -> None:
    cluster.start_redis()
    workers = [cluster.start_worker(claim_idle_ms="1000") for _ in range(2)]
    target = _ready(cluster)

    def fault(done: threading.Event) -> None:
        turn = 0
        while not done.wait(3):
            victim = workers[turn % 2]
            victim.popen.send_signal(signal.SIGKILL)
            victim.popen.wait()
            workers[turn % 2] = cluster.start_worker(claim_idle_ms="1000")
            turn += 1

    _run("kill -9 worker", target, expected, fault)
    _assert_bounded(cluster)


def test_redis_restart_with_aof(cluster: Cluster, expected: dict[str, np.ndarray]) -> None:
    redis_proc = [cluster.start_redis(appendonly=True)]
    cluster.start_worker(claim_idle_ms="2000")
    target = _ready(cluster)

    def fault(done: threading.Event) -> None:
        if done.wait(FAULT_AFTER_S):
            return
        redis_proc[0].stop()  # SIGTERM: Valkey flushes its AOF and exits
        time.sleep(1.5)
        redis_proc[0] = cluster.start_redis(appendonly=True)

    _run("redis restart (AOF)", target, expected, fault)
    _assert_bounded(cluster)


def test_gateway_killed_and_restarted(cluster: Cluster, expected: dict[str, np.ndarray]) -> None:
    cluster.start_redis()
    cluster.start_worker()
    port = free_port()
    gateway: list[Proc] = []
    target = _ready(cluster, port)
    gateway.append(cluster.procs[-1])

    def fault(done: threading.Event) -> None:
        if done.wait(FAULT_AFTER_S):
            return
        gateway[0].popen.send_signal(signal.SIGKILL)
        gateway[0].popen.wait()
        time.sleep(1)
        proc, _ = cluster.start_gateway(port)
        gateway[0] = proc

    _run("kill -9 gateway", target, expected, fault)
    _assert_bounded(cluster)


def test_sigterm_worker_mid_batch(cluster: Cluster, expected: dict[str, np.ndarray]) -> None:
    cluster.start_redis()
    workers = [cluster.start_worker(max_batch_rows="8") for _ in range(2)]
    target = _ready(cluster)

    def fault(done: threading.Event) -> None:
        if done.wait(FAULT_AFTER_S):
            return
        workers[0].popen.send_signal(signal.SIGTERM)
        assert workers[0].popen.wait(60) == 0
        workers[0] = cluster.start_worker(max_batch_rows="8")

    _run("SIGTERM worker", target, expected, fault)
    _assert_bounded(cluster)
