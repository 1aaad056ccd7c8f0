"""Tenants pay for work queued, nothing else: not for a replayed result, not for a call
the queue refused; and an Analyze call keeps its idempotency claim while it computes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.auth import hash_key
from gateway.plans import analyze_jobs
from router import keys
from router.messages import IdempotencyRecord
from tests.clusters import ClusterFactory
from tests.harness import Cluster, Proc, serving, wait_until

pytestmark = pytest.mark.integration

TENANT = "metered"
API_KEY = "metered-key-0123456789"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
# A slow rate (one request per 100 s) with a big burst: never refuses here, and each
# charge moves the GCRA time by a whole interval, so a refund shows exactly.
LIMITS = {"rate_per_s": 0.01, "burst": 100, "quota_units": 1000, "quota_window_s": 3600}
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def cluster(
    make_shared_cluster: ClusterFactory, tmp_path_factory: pytest.TempPathFactory
) -> Cluster:
    """Valkey with a catalog, a gateway with a backlog of 1 and a metered tenant, and no
    worker until a test starts one, so queued jobs stay queued."""
    keys_file = tmp_path_factory.mktemp("charges") / "keys.json"
    tenant = {"key_sha256": hash_key(API_KEY), **LIMITS}
    keys_file.write_text(json.dumps({"tenants": {TENANT: tenant}}))
    gateway = {"api_keys_file": str(keys_file), "max_backlog": "1"}
    # Not SERVING-gated: the stub fixture waits until the tenant is served.
    return make_shared_cluster(workers=0, catalog=True, gateways=[gateway])


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[taskmux_pb2_grpc.TaskMuxStub]:
    with grpc.insecure_channel(cluster.gateways[0].address) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        wait_until(lambda: _ready(stub), 60, "gateway ready")
        yield stub


def _ready(stub: taskmux_pb2_grpc.TaskMuxStub) -> bool:
    try:
        stub.ListTasks(pb.ListTasksRequest(), metadata=AUTH, timeout=2)
    except grpc.RpcError:
        return False
    return True


@pytest.fixture(scope="module")
def worker(cluster: Cluster) -> Proc:
    proc = cluster.start_worker()
    wait_until(lambda: serving(proc.address), 120, "worker SERVING")
    return proc


@pytest.fixture
def r(cluster: Cluster) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(cluster.redis_url)
    yield client
    client.close()


def used(r: redis.Redis) -> int:
    """Text units charged to the tenant in this quota window."""
    return int(r.hget(keys.tenant_quota(TENANT), "used") or 0)


def arrival(r: redis.Redis) -> bytes | None:
    """The tenant's GCRA theoretical arrival time."""
    value: bytes | None = r.get(keys.tenant_rate(TENANT))
    return value


def added(r: redis.Redis, head: str) -> int:
    stream = keys.task_stream(head)
    return int(r.xinfo_stream(stream)["entries-added"]) if r.exists(stream) else 0


def test_a_call_refused_for_a_full_backlog_is_not_charged(
    stub: taskmux_pb2_grpc.TaskMuxStub, r: redis.Redis
) -> None:
    with pytest.raises(grpc.RpcError) as info:  # queued, never answered: charged
        stub.Embed(pb.EmbedRequest(texts=["fills the queue"]), metadata=AUTH, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert used(r) == 1
    charged_until = arrival(r)
    assert charged_until is not None
    for request in (
        pb.EmbedRequest(texts=["one", "two"]),
        pb.EmbedRequest(texts=["keyed", "refused"], idempotency_key="full-1"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(request, metadata=AUTH, timeout=30)
        assert info.value.code() == EXHAUSTED
        assert "is full" in info.value.details()
    assert used(r) == 1  # the refused calls' units were given back
    assert arrival(r) == charged_until  # and so was their place in the rate
    assert not r.exists(keys.idempotency_key("embed", TENANT, "full-1"))


def test_an_analyze_duplicate_during_a_slow_computation_is_computed_and_charged_once(
    stub: taskmux_pb2_grpc.TaskMuxStub, r: redis.Redis, request: pytest.FixtureRequest
) -> None:
    """The duplicate comes well after one lease (IDEMPOTENCY_LEASE_MS) has passed: the
    first call must have renewed its claim, or the duplicate would compute again."""
    call = pb.AnalyzeRequest(
        texts=["slow to start", "no worker yet"], heads=["embed", "sentiment"], idempotency_key="an"
    )
    record = keys.idempotency_key("analyze", TENANT, "an")
    before_units = used(r)

    def analyze() -> list[bytes]:
        results = stub.Analyze(call, metadata=AUTH, timeout=120)
        return sorted(x.SerializeToString() for x in results)

    jobs = len(analyze_jobs(list(call.texts), {}))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(analyze)
        wait_until(lambda: added(r, "_analyze") == jobs, 30, "the first call queued")
        time.sleep(keys.IDEMPOTENCY_LEASE_MS / 1000 + 2)
        raw = r.get(record)
        assert raw is not None and IdempotencyRecord.decode(raw).body is None  # still held
        second = pool.submit(analyze)
        request.getfixturevalue("worker")  # only now can anything be computed
        a, b = first.result(), second.result()
    assert len(a) == 4 and a == b
    assert added(r, "_analyze") == jobs  # computed once
    assert used(r) == before_units + 4  # charged once: 2 texts x 2 heads


@pytest.mark.usefixtures("worker")
def test_a_replayed_keyed_call_is_not_charged(
    stub: taskmux_pb2_grpc.TaskMuxStub, r: redis.Redis
) -> None:
    request = pb.EmbedRequest(texts=["pay once", "for both"], idempotency_key="replay-1")
    first = stub.Embed(request, metadata=AUTH, timeout=60)
    charged, charged_until = used(r), arrival(r)
    again = stub.Embed(request, metadata=AUTH, timeout=60)
    assert again.SerializeToString() == first.SerializeToString()
    assert used(r) == charged
    assert arrival(r) == charged_until
