"""Exactly one answer: idempotency keys and request ids, across two gateway replicas."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.idempotency import request_hash
from router import keys
from router.messages import IdempotencyRecord
from tests.clusters import ClusterFactory
from tests.harness import Cluster, Proc, serving, wait_until

pytestmark = pytest.mark.integration

TTL_S = 120
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def cluster(make_shared_cluster: ClusterFactory) -> Cluster:
    """Valkey, the catalog a worker would leave, two gateways; the worker comes later."""
    gateway = {"idempotency_ttl_s": str(TTL_S)}
    return make_shared_cluster(workers=0, catalog=True, gateways=[gateway, gateway])


@pytest.fixture(scope="module")
def stubs(cluster: Cluster) -> Iterator[list[taskmux_pb2_grpc.TaskMuxStub]]:
    channels = [grpc.insecure_channel(p.address) for p in cluster.gateways]
    yield [taskmux_pb2_grpc.TaskMuxStub(c) for c in channels]
    for channel in channels:
        channel.close()


@pytest.fixture(scope="module")
def worker(cluster: Cluster) -> Proc:
    proc = cluster.start_worker()
    wait_until(lambda: serving(proc.address), 60, "worker SERVING")
    return proc


@pytest.fixture
def r(cluster: Cluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.redis_url)


def added(r: redis.Redis, head: str) -> int:
    """Jobs ever queued for `head` (each one a worker computation)."""
    stream = keys.task_stream(head)
    return int(r.xinfo_stream(stream)["entries-added"]) if r.exists(stream) else 0


def record_key(kind: str, key: str) -> str:
    return keys.idempotency_key(kind, "", key)


def test_a_failed_call_releases_its_key(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    request = pb.EmbedRequest(texts=["nobody computes this yet"], idempotency_key="fails-first")
    with pytest.raises(grpc.RpcError) as info:
        stubs[0].Embed(request, timeout=0.5)  # no worker yet
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not r.exists(record_key("embed", "fails-first"))


def test_concurrent_duplicates_on_two_gateways_are_computed_once(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub],
    r: redis.Redis,
    cluster: Cluster,
    request: pytest.FixtureRequest,
) -> None:
    call = pb.EmbedRequest(texts=["computed once, answered twice"], idempotency_key="dup-1")
    before = added(r, "embed")
    no_worker_yet = not any(p.name == "worker" for p in cluster.procs)  # as in file order
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(stubs[0].Embed, call, timeout=60)
        wait_until(lambda: added(r, "embed") == before + 1, 10, "the first call queued")
        raw = r.get(record_key("embed", "dup-1"))
        if no_worker_yet:
            assert raw is not None and IdempotencyRecord.decode(raw).body is None  # pending
        second = pool.submit(stubs[1].Embed, call, timeout=60)
        request.getfixturevalue("worker")  # only now can anything be computed
        a, b = first.result(), second.result()
    assert a.SerializeToString() == b.SerializeToString()
    assert len(a.embeddings) == 1
    assert added(r, "embed") == before + 1


@pytest.mark.usefixtures("worker")
def test_a_sequential_retry_gets_the_same_bytes_without_computing(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    call = pb.ClassifyRequest(
        head="sentiment", texts=["a fine film"], top_k=2, idempotency_key="seq-1"
    )
    before = added(r, "sentiment")
    first = stubs[0].Classify(call, timeout=30)
    again = stubs[1].Classify(call, timeout=30)
    assert first.SerializeToString() == again.SerializeToString()
    assert added(r, "sentiment") == before + 1
    ttl = r.ttl(record_key("classify", "seq-1"))
    assert 0 < ttl <= TTL_S


@pytest.mark.usefixtures("worker")
def test_the_same_key_with_another_request_is_invalid_argument(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    stubs[0].Embed(pb.EmbedRequest(texts=["one"], idempotency_key="reused"), timeout=30)
    before = added(r, "embed")
    with pytest.raises(grpc.RpcError) as info:
        stubs[1].Embed(pb.EmbedRequest(texts=["two"], idempotency_key="reused"), timeout=30)
    assert info.value.code() == INVALID
    assert "idempotency_key was already used with a different request" in info.value.details()
    assert added(r, "embed") == before


@pytest.mark.usefixtures("worker")
def test_keys_are_scoped_per_rpc_and_ignore_request_ids(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    embed = stubs[0].Embed(pb.EmbedRequest(texts=["scoped"], idempotency_key="scope"), timeout=30)
    classify = stubs[0].Classify(
        pb.ClassifyRequest(head="sentiment", texts=["scoped"], idempotency_key="scope"),
        timeout=30,
    )
    assert embed.embeddings and classify.results  # the same key on another RPC: no clash
    before = added(r, "embed")
    again, call = stubs[1].Embed.with_call(
        pb.EmbedRequest(texts=["scoped"], idempotency_key="scope", request_id="other-id"),
        timeout=30,
    )
    assert again == embed
    assert added(r, "embed") == before
    assert ("x-request-id", "other-id") in call.trailing_metadata()


@pytest.mark.usefixtures("worker")
def test_a_pipeline_task_shares_keys_with_its_unary_rpc(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    task = pb.EmbedRequest(texts=["piped"], idempotency_key="pipe-1")
    unary = stubs[0].Embed(task, timeout=30)
    before = added(r, "embed")
    (response,) = stubs[1].Pipeline(iter([pb.PipelineRequest(id="p", embed=task)]), timeout=30)
    assert response.embed == unary
    assert added(r, "embed") == before


@pytest.mark.usefixtures("worker")
def test_analyze_with_a_key_replays_its_results(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    call = pb.AnalyzeRequest(
        texts=["replay me", "and me", "replay me"],
        heads=["embed", "sentiment"],
        idempotency_key="analyze-1",
    )
    first = list(stubs[0].Analyze(call, timeout=30))
    before = added(r, "_analyze")
    again = list(stubs[1].Analyze(call, timeout=30))
    assert len(first) == 6
    assert sorted(x.SerializeToString() for x in again) == sorted(
        x.SerializeToString() for x in first
    )
    assert added(r, "_analyze") == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("request_id", "x" * 129), ("idempotency_key", "tab\tinside"), ("request_id", "é")],
)
def test_bad_metadata_fields_are_invalid_argument(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], field: str, value: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stubs[0].Embed(pb.EmbedRequest(texts=["x"], **{field: value}), timeout=10)
    assert info.value.code() == INVALID
    assert field in info.value.details()


def test_the_request_hash_ignores_only_the_metadata_fields() -> None:
    base = pb.EmbedRequest(texts=["a"])
    with_meta = pb.EmbedRequest(texts=["a"], request_id="r", idempotency_key="k")
    assert request_hash(base) == request_hash(with_meta)
    assert request_hash(base) != request_hash(pb.EmbedRequest(texts=["b"]))
    assert request_hash(base) != request_hash(pb.ClassifyRequest(texts=["a"]))
