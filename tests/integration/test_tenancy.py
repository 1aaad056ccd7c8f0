"""Tenants on real gateways: rate limits and quotas shared through Redis, and isolation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client import retry_hint_s

from gateway.auth import hash_key, load_keys
from router import keys
from taskmux.config import SettingsError
from tests.clusters import ClusterFactory
from tests.harness import Cluster, Proc, wait_until

pytestmark = pytest.mark.integration

TENANTS = {
    # name: (key, limits)
    "alpha": ("alpha-key-0123456789", {}),
    "beta": ("beta-key-0123456789", {}),
    "rated": ("rated-key-0123456789", {"rate_per_s": 1, "burst": 3}),
    "metered": ("metered-key-0123456789", {"quota_units": 10, "quota_window_s": 3600}),
    # Slow enough that no request is re-admitted while the test runs.
    "shared": ("shared-key-0123456789", {"rate_per_s": 0.01, "burst": 4}),
    "piped": ("piped-key-0123456789", {"rate_per_s": 0.01, "burst": 2}),
}
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def cluster(make_shared_cluster: ClusterFactory) -> Cluster:
    """Valkey and one worker, without the reset between tests: later tests build on the
    limit state of earlier ones (test_a_refused_request_is_not_queued needs the "shared"
    burst that test_limits_are_shared_by_every_gateway_replica spent, and
    test_unlimited_tenants_keep_no_limit_state the "rated" key of the first test)."""
    return make_shared_cluster(reset=False)


@pytest.fixture(scope="module")
def gateways(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> list[Proc]:
    """Two gateway replicas reading the same keys file and the same Redis."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    tenants = {name: {"key_sha256": hash_key(key), **lim} for name, (key, lim) in TENANTS.items()}
    path.write_text(json.dumps({"tenants": tenants}))
    procs = [cluster.start_gateway(api_keys_file=str(path))[0] for _ in range(2)]
    for proc in procs:
        with grpc.insecure_channel(proc.address) as channel:
            stub = taskmux_pb2_grpc.TaskMuxStub(channel)
            wait_until(lambda s=stub: _ready(s), 60, f"gateway {proc.address}")
    return procs


def _ready(stub: taskmux_pb2_grpc.TaskMuxStub) -> bool:
    try:
        stub.ListTasks(pb.ListTasksRequest(), metadata=_as("alpha"), timeout=2)
    except grpc.RpcError:
        return False
    return True


@pytest.fixture(scope="module")
def stubs(gateways: list[Proc]) -> Iterator[list[taskmux_pb2_grpc.TaskMuxStub]]:
    channels = [grpc.insecure_channel(p.address) for p in gateways]
    try:
        yield [taskmux_pb2_grpc.TaskMuxStub(c) for c in channels]
    finally:
        for channel in channels:
            channel.close()


@pytest.fixture
def r(cluster: Cluster) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(cluster.redis_url)
    yield client
    client.close()


def _as(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TENANTS[tenant][0]}"),)


def _embed(stub: taskmux_pb2_grpc.TaskMuxStub, tenant: str, *texts: str) -> pb.EmbedResponse:
    response: pb.EmbedResponse = stub.Embed(
        pb.EmbedRequest(texts=list(texts)), metadata=_as(tenant), timeout=30
    )
    return response


def _refused(stub: taskmux_pb2_grpc.TaskMuxStub, tenant: str, *texts: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _embed(stub, tenant, *texts)
    assert info.value.code() == EXHAUSTED, info.value.details()
    return info.value


def test_rate_admits_exactly_the_burst_then_hints_when_to_retry(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub],
) -> None:
    stub = stubs[0]
    for i in range(3):  # the burst: all admitted at once
        _embed(stub, "rated", f"burst {i}")
    error = _refused(stub, "rated", "one past the burst")
    assert "rate limit of 1 requests/s" in error.details()
    hint = retry_hint_s(error)
    assert hint is not None and 0 < hint <= 1.0
    time.sleep(hint + 0.05)
    _embed(stub, "rated", "after the hint")  # the bucket has room again


def test_quota_admits_up_to_exactly_the_quota(stubs: list[taskmux_pb2_grpc.TaskMuxStub]) -> None:
    stub = stubs[0]
    _embed(stub, "metered", *(f"q{i}" for i in range(4)))
    _embed(stub, "metered", *(f"q{i}" for i in range(4, 10)))  # exactly at the quota
    error = _refused(stub, "metered", "one past")
    assert "0 of its 10 text units left" in error.details()
    hint = retry_hint_s(error)
    assert hint is not None and 0 < hint <= 3600


def test_request_bigger_than_the_whole_quota_has_no_retry_hint(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub],
) -> None:
    error = _refused(stubs[0], "metered", *(f"big {i}" for i in range(11)))
    assert "split it" in error.details()
    assert retry_hint_s(error) is None  # waiting would not help: clients must not retry


def test_limits_are_shared_by_every_gateway_replica(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub],
) -> None:
    for i in range(4):  # the burst of 4, split over both replicas
        _embed(stubs[i % 2], "shared", f"s{i}")
    for stub in stubs:
        _refused(stub, "shared", "fifth")


def test_a_refused_request_is_not_queued(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    stream = keys.task_stream("embed")
    before = int(r.xinfo_stream(stream)["entries-added"])
    _refused(stubs[0], "shared", "still over")
    assert int(r.xinfo_stream(stream)["entries-added"]) == before


def test_pipeline_task_over_the_limit_gets_its_own_error(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub],
) -> None:
    tasks = [
        pb.PipelineRequest(id=f"t{i}", embed=pb.EmbedRequest(texts=[f"p{i}"])) for i in range(3)
    ]
    responses = list(stubs[0].Pipeline(iter(tasks), metadata=_as("piped"), timeout=30))
    by_id = {r.id: r for r in responses}
    assert set(by_id) == {"t0", "t1", "t2"}
    refused = [r for r in responses if r.WhichOneof("result") == "error"]
    assert len(refused) == 1  # burst 2: the stream goes on, one task is refused
    assert refused[0].error.status == "RESOURCE_EXHAUSTED"
    assert refused[0].error.retry_after_ms > 0


def test_unlimited_tenants_keep_no_limit_state(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    _embed(stubs[0], "alpha", "free")
    assert not r.exists(keys.tenant_rate("alpha"), keys.tenant_quota("alpha"))
    assert r.pttl(keys.tenant_rate("rated")) > 0  # limited tenants' state expires


def test_results_never_cross_tenants_even_with_colliding_ids(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub],
) -> None:
    """Both tenants send the same request_id and idempotency_key at the same time, through
    both replicas; each must get the embedding of its own text, never the other's."""
    texts = {"alpha": "the cat sat on the mat", "beta": "quarterly revenue grew by ten percent"}
    reference = {
        tenant: np.array(_embed(stubs[0], tenant, text).embeddings[0].values)
        for tenant, text in texts.items()
    }
    assert float(reference["alpha"] @ reference["beta"]) < 0.9  # distinguishable results

    def call(i: int) -> tuple[str, np.ndarray]:
        tenant = ("alpha", "beta")[i % 2]
        request = pb.EmbedRequest(
            texts=[texts[tenant]], request_id="same-id", idempotency_key="same-key"
        )
        response = stubs[(i // 2) % 2].Embed(request, metadata=_as(tenant), timeout=30)
        return tenant, np.array(response.embeddings[0].values)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(40)))
    for tenant, vector in results:
        assert float(vector @ reference[tenant]) > 0.999, tenant


def test_idempotency_keys_are_per_tenant(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    """Another tenant's key names another record: reusing it for a different request is
    no error, and never returns the first tenant's stored result."""
    first = pb.EmbedRequest(texts=["a private sentence"], idempotency_key="guessable")
    stubs[0].Embed(first, metadata=_as("alpha"), timeout=30)
    other = pb.EmbedRequest(texts=["something else entirely"], idempotency_key="guessable")
    theirs = stubs[1].Embed(other, metadata=_as("beta"), timeout=30)
    mine = stubs[1].Embed(first, metadata=_as("alpha"), timeout=30)  # alpha's replay
    assert list(theirs.embeddings[0].values) != list(mine.embeddings[0].values)
    assert r.exists(keys.idempotency_key("embed", "alpha", "guessable"))
    assert r.exists(keys.idempotency_key("embed", "beta", "guessable"))


def test_failed_calls_are_logged_with_request_id_and_tenant(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], gateways: list[Proc]
) -> None:
    request = pb.ClassifyRequest(texts=["x"], head="no-such-head", request_id="req-log-1")
    with pytest.raises(grpc.RpcError):
        stubs[0].Classify(request, metadata=_as("alpha"), timeout=30)

    def logged() -> list[dict[str, str]]:
        # Whole lines only: the gateway may be mid-way through writing the last one.
        written = gateways[0].output().splitlines(keepends=True)
        lines = [json.loads(x) for x in written if x.startswith("{") and x.endswith("\n")]
        return [x for x in lines if x.get("request_id") == "req-log-1"]

    wait_until(lambda: bool(logged()), 10, "the access-log line")
    (line,) = logged()
    assert line["tenant"] == "alpha"
    assert "Classify NOT_FOUND" in line["message"]
    assert TENANTS["alpha"][0] not in gateways[0].output()


def test_limit_fields_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"

    def load(entry: dict[str, object], name: str = "acme") -> None:
        path.write_text(json.dumps({"tenants": {name: {"key_sha256": "a" * 64, **entry}}}))
        load_keys(path)

    load({"rate_per_s": 2.5, "burst": 5, "quota_units": 100, "quota_window_s": 60})
    for bad in (
        {"rate_per_s": -1},
        {"burst": 1.5},
        {"quota_units": "lots"},
        {"quota_window_s": 0},
        {"burst": True},
    ):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            load(bad)
    with pytest.raises(SettingsError, match="tenant name"):
        load({}, name="acme corp:*")


def test_every_tenant_limit_resets_with_its_keys(
    stubs: list[taskmux_pb2_grpc.TaskMuxStub], r: redis.Redis
) -> None:
    """Operators reset a tenant by deleting its two keys, as router/keys.py documents."""
    r.delete(keys.tenant_rate("shared"), keys.tenant_quota("shared"))
    _embed(stubs[0], "shared", "after a reset")
