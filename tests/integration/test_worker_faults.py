"""A worker under faults: bad parameters, a full Redis, a Redis restart, a slow drain.

Each test writes jobs straight into the task streams (or calls through a gateway) and
checks the worker's promises from outside, with real Valkey and worker processes:

- a job that decodes but cannot be computed is answered and dead-lettered, and the
  worker lives on (issue 11, item 6);
- a reply Redis refuses (full under `noeviction`) is never lost: its job stays pending
  with the worker, which writes it once Redis accepts writes again (items 2 and 14);
- calls in flight across a Redis restart are answered soon after it returns, with no
  client retry (item 14);
- SIGTERM turns health NOT_SERVING at once and the worker exits within its drain
  timeout, leaving what it could not finish pending for others (item 7).
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from router import keys
from router.messages import Job
from tests.clusters import ClusterFactory
from tests.harness import Cluster, Proc, health_status, serving, wait_until

pytestmark = pytest.mark.integration

SERVING, NOT_SERVING = 1, 2
SINK = keys.reply_stream("faults")
OK = grpc.StatusCode.OK.value[0]


@pytest.fixture
def cluster(make_cluster: ClusterFactory) -> Cluster:
    return make_cluster(start_redis=False)


def _worker_up(r: redis.Redis, worker: Proc) -> None:
    wait_until(lambda: health_status(worker.address) == SERVING, 90, "worker SERVING")
    wait_until(lambda: bool(r.exists(SINK)), 5, "reply sink")


def _job(i: int, kind: str, head: str, texts: tuple[str, ...], **params: object) -> Job:
    deadline = int(time.time() * 1000) + 120_000
    return Job(f"{kind}-{i}", SINK, deadline, kind, head, texts, params=dict(params))


def _put(r: redis.Redis, jobs: list[Job], fields: dict[str, str] | None = None) -> None:
    for job in jobs:
        r.xadd(keys.task_stream(job.head), {**job.encode(), **(fields or {})})  # type: ignore[dict-item]


def _replies(r: redis.Redis) -> dict[str, int]:
    """Request id -> status code of every reply in the sink."""
    return {f[b"id"].decode(): int(f[b"code"]) for _, f in r.xrange(SINK) if f.get(b"v") == b"1"}


def _sink(r: redis.Redis) -> None:
    r.xadd(SINK, {"v": "init"})


# --- item 6: bad parameters ---------------------------------------------------------

PARAMS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
KINDS = st.sampled_from(
    [
        ("zero_shot", "zero-shot"),
        ("analyze", "_analyze"),
        ("similarity", "similarity"),
        ("classify", "sentiment"),
        ("entities", "entities"),
        ("embed", "embed"),
    ]
)


@pytest.fixture(scope="module")
def fuzz_cluster(make_shared_cluster: ClusterFactory) -> Cluster:
    c = make_shared_cluster(workers=0)
    r = redis.Redis.from_url(c.redis_url)
    _sink(r)  # before the worker: it writes replies only to a stream that exists
    worker = c.start_worker(claim_idle_ms="1000")
    _worker_up(r, worker)
    return c


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=KINDS,
    labels=PARAMS,
    heads=PARAMS,
    template=PARAMS,
    extra=st.dictionaries(st.text(max_size=6), PARAMS, max_size=2),
    texts=st.lists(st.text(max_size=20), min_size=0, max_size=3),
    top_k=st.integers(-3, 10_000),
)
def test_well_formed_entries_with_bad_parameters_never_kill_the_worker(
    fuzz_cluster: Cluster,
    kind: tuple[str, str],
    labels: object,
    heads: object,
    template: object,
    extra: dict[str, object],
    texts: list[str],
    top_k: int,
) -> None:
    r = redis.Redis.from_url(fuzz_cluster.redis_url)
    worker = next(p for p in fuzz_cluster.procs if p.name == "worker")
    params = {**extra, "labels": labels, "heads": heads, "template": template}
    job = Job(
        f"fuzz-{time.monotonic_ns()}",
        SINK,
        int(time.time() * 1000) + 60_000,
        kind[0],
        kind[1],
        tuple(texts),
        top_k=top_k,
    )
    fields = {**job.encode(), "params": json.dumps(params)}
    stream = keys.task_stream(kind[1])
    r.xadd(stream, fields)  # type: ignore[arg-type]
    # Answered (result or error), acknowledged and deleted; the worker still serves.
    wait_until(lambda: job.id in _replies(r), 15, f"a reply to {fields}")
    wait_until(lambda: r.xlen(stream) == 0, 10, "the entry acknowledged and deleted")
    assert worker.popen.poll() is None, worker.output()[-3000:]
    code = _replies(r)[job.id]
    allowed = {OK, 3, 5, 13}  # OK, INVALID_ARGUMENT, NOT_FOUND, INTERNAL
    assert code in allowed, (code, fields)


def test_a_job_that_cannot_be_computed_is_dead_lettered_with_its_reason(cluster: Cluster) -> None:
    cluster.start_redis()
    r = redis.Redis.from_url(cluster.redis_url)
    _sink(r)
    worker = cluster.start_worker()
    _worker_up(r, worker)
    bad = [
        _job(1, "zero_shot", "zero-shot", ("no labels",)),
        _job(2, "analyze", "_analyze", ("heads not a list",), heads="sentiment"),
        _job(3, "similarity", "similarity", ("a query without candidates",)),
        _job(4, "zero_shot", "zero-shot", ("labels of numbers",), labels=[1, 2]),
    ]
    good = [_job(5, "embed", "embed", ("a fine text",))]
    _put(r, bad + good)
    wait_until(lambda: len(_replies(r)) == 5, 30, "five replies")
    codes = _replies(r)
    assert codes["embed-5"] == OK
    assert all(codes[j.id] == grpc.StatusCode.INTERNAL.value[0] for j in bad), codes
    reasons = [f[b"reason"].decode() for _, f in r.xrange(keys.DEAD_LETTER_STREAM)]
    assert len(reasons) == len(bad), reasons
    assert any("labels" in reason for reason in reasons), reasons
    assert worker.popen.poll() is None


# --- items 2 and 14: a full Redis ----------------------------------------------------


def test_replies_refused_by_a_full_redis_are_kept_and_written_when_it_frees(
    cluster: Cluster,
) -> None:
    cluster.start_redis()
    r = redis.Redis.from_url(cluster.redis_url)
    _sink(r)
    worker = cluster.start_worker(claim_idle_ms="1000")
    _worker_up(r, worker)
    jobs = [_job(i, "embed", "embed", (f"kept while Redis is full {i}",)) for i in range(20)]
    # Queued while the worker is paused, then Redis fills: below what it already uses,
    # every write that needs memory is refused, while reads, XACK and XDEL still work.
    worker.popen.send_signal(signal.SIGSTOP)
    try:
        _put(r, jobs)
        r.config_set("maxmemory", 1)
    finally:
        worker.popen.send_signal(signal.SIGCONT)

    def held() -> int:
        return int(r.xpending(keys.task_stream("embed"), keys.WORKER_GROUP)["pending"])

    wait_until(lambda: held() == len(jobs), 30, "every job pulled and held")
    time.sleep(3)  # several publish attempts, and longer than claim_idle_ms
    assert not _replies(r), "a reply was written past maxmemory"
    assert held() == len(jobs), "a job was acknowledged without its reply"
    assert "could not publish" in worker.output()
    r.config_set("maxmemory", 0)
    wait_until(lambda: len(_replies(r)) == len(jobs), 15, "every kept reply written")
    assert set(_replies(r).values()) == {OK}
    wait_until(lambda: held() == 0, 5, "every job acknowledged")
    assert "reclaimed" not in worker.output(), "held work was reclaimed from under its worker"


# --- item 14: a Redis restart --------------------------------------------------------


def test_calls_in_flight_across_a_redis_restart_are_answered_without_a_retry(
    cluster: Cluster,
) -> None:
    redis_proc = cluster.start_redis(appendonly=True)
    r = redis.Redis.from_url(cluster.redis_url)
    worker = cluster.start_worker(max_batch_rows="4")
    _, target = cluster.start_gateway()
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    wait_until(lambda: health_status(worker.address) == SERVING, 90, "worker SERVING")
    channel = grpc.insecure_channel(target)
    stub = taskmux_pb2_grpc.TaskMuxStub(channel)
    stub.Embed(pb.EmbedRequest(texts=["warm up"]), timeout=30)
    texts = [f"a long text in flight across a restart {i} " * 40 for i in range(24)]
    stream = keys.task_stream("embed")
    with ThreadPoolExecutor(len(texts)) as pool:
        # A plain stub: no client retry, one attempt with a 60 s deadline each.
        # Every call queued first (the worker paused), then some of them pulled: the
        # restart catches jobs both queued and held by the worker.
        worker.popen.send_signal(signal.SIGSTOP)
        try:
            calls = [pool.submit(stub.Embed, pb.EmbedRequest(texts=[t]), timeout=60) for t in texts]
            wait_until(lambda: r.xlen(stream) == len(texts), 20, "every call queued")
        finally:
            worker.popen.send_signal(signal.SIGCONT)
        wait_until(lambda: _pending(r, stream) > 0, 20, "jobs held by the worker")
        redis_proc.popen.send_signal(signal.SIGKILL)
        redis_proc.popen.wait()
        time.sleep(3)
        cluster.start_redis(appendonly=True)
        back = time.monotonic()
        results = [c.result() for c in calls]
        took = time.monotonic() - back
    channel.close()
    assert all(len(res.embeddings[0].values) == 384 for res in results)
    print(f"redis restart: {len(texts)} calls in flight answered {took:.1f}s after its return")
    assert took < 30, f"calls in flight took {took:.1f}s after Redis returned"


def _pending(r: redis.Redis, stream: str) -> int:
    return int(r.xpending(stream, keys.WORKER_GROUP)["pending"])


# --- item 7: drain ---------------------------------------------------------------------


def test_drain_is_bounded_and_leaves_the_rest_pending(cluster: Cluster) -> None:
    cluster.start_redis()
    r = redis.Redis.from_url(cluster.redis_url)
    _sink(r)
    # A slow encoder: one long text per batch, one thread.
    worker = cluster.start_worker(
        max_batch_rows="1", intra_op_threads="1", drain_timeout_s="2", prefetch_batches="100"
    )
    _worker_up(r, worker)
    stream = keys.task_stream("embed")
    jobs = [_job(i, "embed", "embed", (f"slow text {i} " * 200,)) for i in range(300)]
    _put(r, jobs)
    wait_until(lambda: len(_replies(r)) >= 1, 60, "the worker at work")
    worker.popen.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: health_status(worker.address) != SERVING, 2, "NOT_SERVING at once")
    code = worker.popen.wait(2 + 10)
    took = time.monotonic() - signalled
    print(f"drain: exited {code} {took:.1f}s after SIGTERM (drain timeout 2 s)")
    left = r.xlen(stream)
    assert left > 0, "the worker finished everything: the drain limit was not exercised"
    # What it did not answer is still in the stream; a new worker serves all of it.
    cluster.start_worker(claim_idle_ms="500", max_batch_rows="8")
    wait_until(lambda: len(_replies(r)) == len(jobs), 120, "every job answered")
    assert set(_replies(r).values()) == {OK}
