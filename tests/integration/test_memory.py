"""Redis near or at maxmemory: calls get RESOURCE_EXHAUSTED with a retry hint, at once,
and are accepted again once there is room, without restarting anything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client import retry_hint_s

from router import keys
from tests.harness import Cluster, wait_for_catalog, wait_until

pytestmark = pytest.mark.integration

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def gateways(cluster: Cluster, model_repo: Path) -> dict[str, str]:
    """One gateway with the memory guard (the default high water), one without it."""
    addresses = {
        "guarded": cluster.start_gateway(monitor_interval_ms="200")[1],
        "unguarded": cluster.start_gateway(redis_memory_high_water="0")[1],
    }
    for address in addresses.values():
        wait_for_catalog(address, model_repo)
    return addresses


@pytest.fixture
def r(cluster: Cluster) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(cluster.redis_url)
    yield client
    client.config_set("maxmemory", 0)  # whatever a test did
    client.close()


def _call(address: str, request: pb.EmbedRequest) -> grpc.RpcError | None:
    """The error of one Embed call, or None if it succeeded."""
    with grpc.insecure_channel(address) as channel:
        try:
            taskmux_pb2_grpc.TaskMuxStub(channel).Embed(request, timeout=30)
        except grpc.RpcError as err:
            return err
    return None


def _exhausted(address: str, request: pb.EmbedRequest, says: str) -> grpc.RpcError:
    err = _call(address, request)
    assert err is not None, "the call succeeded"
    assert err.code() == EXHAUSTED, (err.code(), err.details())
    assert says in err.details()
    hint = retry_hint_s(err)
    assert hint is not None and hint > 0
    assert ("retry-after-ms", str(int(hint * 1000))) in err.trailing_metadata()
    return err


def _added(r: redis.Redis) -> int:
    stream = keys.task_stream("embed")
    return int(r.xinfo_stream(stream)["entries-added"]) if r.exists(stream) else 0


def test_near_maxmemory_new_calls_are_refused_then_accepted_again(
    gateways: dict[str, str], r: redis.Redis
) -> None:
    address = gateways["guarded"]
    assert _call(address, pb.EmbedRequest(texts=["before"])) is None
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used + 64 * 1024)  # just above: over the 85 % mark
    near = "Redis is near its memory limit"

    def refused() -> bool:
        err = _call(address, pb.EmbedRequest(texts=["while full"]))
        return err is not None and near in err.details()

    wait_until(refused, 30, "the memory guard to refuse calls")
    before = _added(r)
    _exhausted(address, pb.EmbedRequest(texts=["refused"]), near)
    _exhausted(address, pb.EmbedRequest(texts=["keyed"], idempotency_key="mem-1"), near)
    assert _added(r) == before  # refused before anything was queued
    assert not r.exists(keys.idempotency_key("embed", "", "mem-1"))  # or claimed

    r.config_set("maxmemory", 0)
    wait_until(
        lambda: _call(address, pb.EmbedRequest(texts=["after"])) is None,
        30,
        "calls accepted again once Redis has room",
    )


def test_at_maxmemory_redis_refusing_writes_is_resource_exhausted(
    gateways: dict[str, str], r: redis.Redis
) -> None:
    """Without the guard, Redis's own OOM error on the gateway's writes (the enqueue
    script, which also claims a keyed call's record) still reaches the caller as a
    retryable refusal, with nothing queued or claimed."""
    address = gateways["unguarded"]
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used // 2)  # below use: noeviction refuses every write
    before = _added(r)
    at_limit = "at its memory limit"
    err = _exhausted(address, pb.EmbedRequest(texts=["unkeyed"]), at_limit)
    assert "task queue" in err.details()
    err = _exhausted(address, pb.EmbedRequest(texts=["keyed"], idempotency_key="oom"), at_limit)
    assert "task queue" in err.details()
    assert _added(r) == before
    assert not r.exists(keys.idempotency_key("embed", "", "oom"))

    r.config_set("maxmemory", 0)
    assert _call(address, pb.EmbedRequest(texts=["room again"], idempotency_key="oom")) is None
