"""Nothing lost when a worker dies: reclaiming, poison jobs, slow work, drain on SIGTERM."""

from __future__ import annotations

import signal
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from router import keys
from tests.clusters import ClusterFactory
from tests.harness import Cluster, serving, wait_until

pytestmark = pytest.mark.integration

GHOST = "ghost-worker"  # a consumer that pulls and then "dies" without acknowledging
STREAM = keys.task_stream("embed")


@pytest.fixture
def cluster(make_cluster: ClusterFactory) -> Cluster:
    c = make_cluster(workers=0)
    redis.Redis.from_url(c.redis_url).xgroup_create(
        STREAM, keys.WORKER_GROUP, id="0", mkstream=True
    )
    return c


def _gateway(cluster: Cluster) -> taskmux_pb2_grpc.TaskMuxStub:
    _, target = cluster.start_gateway()
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    return taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(target))


def _steal(r: redis.Redis, count: int) -> list[bytes]:
    """Read pending work as the ghost consumer, which then never acknowledges it."""
    ids: list[bytes] = []
    for _, entries in r.xreadgroup(keys.WORKER_GROUP, GHOST, {STREAM: ">"}, count=count) or []:
        ids += [entry_id for entry_id, _ in entries]
    return ids


def test_work_held_by_a_dead_worker_is_reclaimed(cluster: Cluster) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    stub = _gateway(cluster)
    texts = [f"orphaned request {i}" for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        calls = [pool.submit(stub.Embed, pb.EmbedRequest(texts=[t]), timeout=60) for t in texts]
        wait_until(lambda: r.xlen(STREAM) == 5, 20, "5 queued jobs")
        assert len(_steal(r, 10)) == 5
        cluster.start_worker(claim_idle_ms="500")
        results = [c.result() for c in calls]
    assert all(len(res.embeddings[0].values) == 384 for res in results)
    assert r.xlen(STREAM) == 0
    assert r.xpending(STREAM, keys.WORKER_GROUP)["pending"] == 0


def test_a_job_that_keeps_failing_goes_to_the_dead_letters(cluster: Cluster) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    stub = _gateway(cluster)
    with ThreadPoolExecutor(1) as pool:
        call: Future[pb.EmbedResponse] = pool.submit(
            stub.Embed, pb.EmbedRequest(texts=["poison"]), timeout=60
        )
        wait_until(lambda: r.xlen(STREAM) == 1, 20, "the job queued")
        (entry,) = _steal(r, 1)
        for _ in range(3):  # three more failed deliveries, as crashing workers would leave
            r.xclaim(STREAM, keys.WORKER_GROUP, GHOST, 0, [entry])
        dead_before = r.xlen(keys.DEAD_LETTER_STREAM)
        cluster.start_worker(claim_idle_ms="300", max_deliveries="3")
        with pytest.raises(grpc.RpcError) as info:
            call.result()
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "dead letters" in info.value.details()
    assert r.xlen(keys.DEAD_LETTER_STREAM) == dead_before + 1
    assert r.xpending(STREAM, keys.WORKER_GROUP)["pending"] == 0


def test_sigterm_mid_batch_finishes_and_acknowledges(cluster: Cluster) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    stub = _gateway(cluster)
    worker = cluster.start_worker(max_batch_rows="4")
    wait_until(lambda: bool(list(r.scan_iter(match=keys.worker_catalog("*")))), 60, "worker up")
    texts = [f"a long text to keep the worker busy {i} " * 30 for i in range(24)]
    with ThreadPoolExecutor(len(texts)) as pool:
        calls = [pool.submit(stub.Embed, pb.EmbedRequest(texts=[t]), timeout=60) for t in texts]
        wait_until(
            lambda: r.xpending(STREAM, keys.WORKER_GROUP)["pending"] > 0, 20, "work in flight"
        )
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(30) == 0
        assert "worker stopped" in worker.output()
        # What it pulled, it answered and acknowledged; a new worker serves the rest.
        assert r.xpending(STREAM, keys.WORKER_GROUP)["pending"] == 0
        cluster.start_worker()
        # Every call succeeds: .result() raises whatever the call raised in its thread.
        got = [c.result(timeout=90) for c in calls]
    assert all(len(res.embeddings[0].values) == 384 for res in got)
