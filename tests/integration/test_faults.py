"""What callers see when parts are missing: no worker, no Redis, a corrupt model."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import pytest
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from model.manifest import load_manifest
from tests.clusters import ClusterFactory, seed_catalog
from tests.harness import Cluster, health_status, serving, wait_until

pytestmark = pytest.mark.integration

SERVING = 1
NOT_SERVING = 2


@pytest.fixture
def cluster(make_cluster: ClusterFactory) -> Cluster:
    return make_cluster(start_redis=False)


def _stub(target: str) -> taskmux_pb2_grpc.TaskMuxStub:
    return taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(target))


def test_no_worker_call_ends_at_its_deadline(cluster: Cluster, model_repo: Path) -> None:
    cluster.start_redis()
    seed_catalog(cluster)  # as a worker that has since gone away would have left it
    _, target = cluster.start_gateway()
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    stub = _stub(target)
    head = next(
        h.name for h in load_manifest(model_repo, verify=False).heads if h.kind == "classification"
    )
    calls = [
        lambda: stub.Embed(pb.EmbedRequest(texts=["anyone there?"]), timeout=2),
        lambda: stub.Classify(pb.ClassifyRequest(head=head, texts=["hello?"]), timeout=2),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            call()
        elapsed = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < 4.0, f"call took {elapsed:.1f}s with a 2s deadline"


def test_classify_before_any_worker_registered_is_unavailable(cluster: Cluster) -> None:
    cluster.start_redis()
    _, target = cluster.start_gateway()
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    with pytest.raises(grpc.RpcError) as info:
        _stub(target).Classify(pb.ClassifyRequest(head="sentiment", texts=["x"]), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no worker" in info.value.details()


def test_redis_down_means_not_serving_and_unavailable(cluster: Cluster) -> None:
    _, target = cluster.start_gateway()  # Redis is not started yet
    wait_until(lambda: health_status(target) == NOT_SERVING, 30, "gateway NOT_SERVING")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        _stub(target).Embed(pb.EmbedRequest(texts=["x"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis" in info.value.details()
    assert time.monotonic() - started < 5
    cluster.start_redis()
    wait_until(lambda: serving(target), 30, "gateway SERVING once Redis is up")


def test_worker_refuses_a_corrupt_model_repository(cluster: Cluster, model_repo: Path) -> None:
    copy = cluster.workdir / "repo"
    shutil.copytree(model_repo, copy)
    tokenizer = copy / load_manifest(copy, verify=False).encoder.tokenizer_file
    data = bytearray(tokenizer.read_bytes())
    data[10] ^= 0xFF
    tokenizer.write_bytes(bytes(data))
    cluster.model_repo = copy
    cluster.start_redis()
    worker = cluster.start_worker()
    assert worker.popen.wait(60) == 2
    assert "checksum mismatch for encoder/tokenizer.json" in worker.output()


def test_liveness_ignores_redis_but_readiness_follows_it(cluster: Cluster) -> None:
    worker = cluster.start_worker()  # Redis is not started yet
    _, target = cluster.start_gateway()
    for address in (worker.address, target):
        wait_until(lambda a=address: health_status(a, "liveness") == SERVING, 60, "liveness")
        # The startup probe's service: start-up done (the worker's model loaded), though
        # Redis is down, so kubelet would not kill a starting pod for a Redis outage.
        wait_until(lambda a=address: health_status(a, "started") == SERVING, 60, "started")
        assert health_status(address) == NOT_SERVING
    cluster.start_redis()
    for address in (worker.address, target):
        wait_until(lambda a=address: health_status(a) == SERVING, 30, "readiness with Redis")
