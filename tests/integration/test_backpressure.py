"""Backpressure: a full head stream answers RESOURCE_EXHAUSTED at once, with a retry hint."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import redis
from google.rpc.error_details_pb2 import RetryInfo
from grpc_status import rpc_status
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client import Attempt, ResourceExhaustedError, RetryPolicy, TaskMuxClient

from gateway.errors import ResourceExhausted
from gateway.plans import ANALYZE_TEXTS_PER_JOB
from router import keys
from tests.clusters import ClusterFactory
from tests.harness import Cluster

pytestmark = pytest.mark.integration

MAX_BACKLOG = 3
RETRY_AFTER_MS = 250
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def cluster(make_shared_cluster: ClusterFactory) -> Cluster:
    """Valkey with a catalog but no worker, so queued jobs stay queued (and the clean
    keyspace empties the queues before each test)."""
    gateway = {"max_backlog": str(MAX_BACKLOG), "backlog_retry_after_ms": str(RETRY_AFTER_MS)}
    return make_shared_cluster(workers=0, catalog=True, gateways=[gateway])


@pytest.fixture
def target(cluster: Cluster) -> str:
    return cluster.gateways[0].address


@pytest.fixture
def stub(target: str) -> Iterator[taskmux_pb2_grpc.TaskMuxStub]:
    with grpc.insecure_channel(target) as channel:
        yield taskmux_pb2_grpc.TaskMuxStub(channel)


def fill(stub: taskmux_pb2_grpc.TaskMuxStub, n: int) -> None:
    """Queue n embed jobs that nobody will take (their calls time out, the jobs stay)."""
    for i in range(n):
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(texts=[f"queued {i}"]), timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_full_stream_is_refused_at_once_with_a_retry_hint(
    stub: taskmux_pb2_grpc.TaskMuxStub, cluster: Cluster
) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    stream = keys.task_stream("embed")
    fill(stub, MAX_BACKLOG)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(texts=["one too many"]), timeout=30)
    elapsed = time.monotonic() - started
    err = info.value
    assert err.code() == EXHAUSTED
    assert "full" in err.details() and str(MAX_BACKLOG) in err.details()
    assert elapsed < 5, f"refused after {elapsed:.1f}s; it should not wait for the deadline"
    status = rpc_status.from_call(err)
    assert status is not None and len(status.details) == 1
    info_detail = RetryInfo()
    assert status.details[0].Unpack(info_detail)
    assert info_detail.retry_delay.ToMilliseconds() == RETRY_AFTER_MS
    assert ("retry-after-ms", str(RETRY_AFTER_MS)) in err.trailing_metadata()
    # Nothing was added and nothing was trimmed.
    assert r.xlen(stream) == MAX_BACKLOG
    assert r.xinfo_stream(stream)["entries-added"] == MAX_BACKLOG


def test_the_limit_is_per_head(stub: taskmux_pb2_grpc.TaskMuxStub) -> None:
    fill(stub, MAX_BACKLOG)
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(pb.ClassifyRequest(head="sentiment", texts=["x"]), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # queued, not refused


def test_room_again_once_workers_drain_the_stream(
    stub: taskmux_pb2_grpc.TaskMuxStub, cluster: Cluster
) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    stream = keys.task_stream("embed")
    fill(stub, MAX_BACKLOG)
    oldest = r.xrange(stream, count=1)[0][0]
    r.xdel(stream, oldest)  # what a worker does once it has answered a job
    fill(stub, 1)
    assert r.xlen(stream) == MAX_BACKLOG


def test_an_analyze_call_is_queued_whole_or_refused(
    stub: taskmux_pb2_grpc.TaskMuxStub, cluster: Cluster
) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    stream = keys.task_stream("_analyze")
    # Texts for one job more than the backlog holds.
    texts = [f"text {i}" for i in range(MAX_BACKLOG * ANALYZE_TEXTS_PER_JOB + 1)]
    many = pb.AnalyzeRequest(texts=texts, heads=["embed"])
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Analyze(many, timeout=0.3))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    jobs = MAX_BACKLOG + 1
    assert r.xlen(stream) == jobs  # one request may overshoot the bound, never split
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Analyze(pb.AnalyzeRequest(texts=["e"], heads=["embed"]), timeout=10))
    assert info.value.code() == EXHAUSTED
    assert r.xlen(stream) == jobs


def test_a_pipeline_task_gets_the_hint_in_its_task_error(
    stub: taskmux_pb2_grpc.TaskMuxStub,
) -> None:
    fill(stub, MAX_BACKLOG)
    requests = [pb.PipelineRequest(id="t", embed=pb.EmbedRequest(texts=["x"]))]
    (response,) = stub.Pipeline(iter(requests), timeout=10)
    assert response.error.status == "RESOURCE_EXHAUSTED"
    assert response.error.retry_after_ms == RETRY_AFTER_MS


def test_a_refused_call_releases_its_idempotency_key(
    stub: taskmux_pb2_grpc.TaskMuxStub, cluster: Cluster
) -> None:
    fill(stub, MAX_BACKLOG)
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(texts=["x"], idempotency_key="refused"), timeout=10)
    assert info.value.code() == EXHAUSTED
    r = redis.Redis.from_url(cluster.redis_url)
    assert not list(r.scan_iter(match=keys.PREFIX + "idem:embed:*"))


def test_the_client_waits_at_least_the_hint_between_attempts(
    stub: taskmux_pb2_grpc.TaskMuxStub, target: str
) -> None:
    fill(stub, MAX_BACKLOG)
    attempts: list[Attempt] = []
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.001)
    with (
        TaskMuxClient(target, timeout_s=10, retry=policy, on_attempt=attempts.append) as client,
        pytest.raises(ResourceExhaustedError) as info,
    ):
        client.embed(["still full"])
    assert [a.code for a in attempts] == [EXHAUSTED] * 3
    waits = [a.retry_in_s for a in attempts]
    assert waits[-1] is None
    assert all(w is not None and w >= RETRY_AFTER_MS / 1000 for w in waits[:-1])
    assert info.value.attempts == 3
    assert info.value.retry_after_s == RETRY_AFTER_MS / 1000
    assert len({a.request_id for a in attempts}) == 1


def test_the_rich_status_of_the_error_class() -> None:
    err = ResourceExhausted("full", retry_after_ms=1500)
    metadata = dict(err.trailing_metadata())
    assert metadata["retry-after-ms"] == "1500"
    assert isinstance(metadata["grpc-status-details-bin"], bytes)
