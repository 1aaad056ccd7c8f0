"""Redis connections: many more calls in flight than pooled connections still all succeed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from router.connection import RedisSettings
from tests.harness import Cluster, wait_for_catalog

pytestmark = pytest.mark.integration

CALLS = 500
TEXTS = [f"t{i}" for i in range(8)]


def test_max_connections_is_a_setting() -> None:
    assert RedisSettings.from_env({}).max_connections == RedisSettings.max_connections
    env = {"TASKMUX_REDIS_MAX_CONNECTIONS": "7"}
    assert RedisSettings.from_env(env).max_connections == 7


@pytest.mark.parametrize("max_connections", ["", "4"])
async def test_concurrent_keyed_calls_wait_for_connections_instead_of_failing(
    cluster: Cluster, model_repo: Path, max_connections: str
) -> None:
    """500 keyed Embeds at once over one channel, with the default pool and with a pool of
    4, far fewer connections than calls. redis-py's default pool, capped at 4, failed 39
    of them with UNAVAILABLE "the idempotency store (Redis) is unreachable
    (MaxConnectionsError)", as 141 of 2,400 calls failed under `taskmux up` with its cap
    of 100; waiting for a free connection fails none."""
    env = {"redis_max_connections": max_connections} if max_connections else {}
    _, address = cluster.start_gateway(**env)
    await asyncio.to_thread(wait_for_catalog, address, model_repo)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)

        async def call(i: int) -> str:
            """An empty string for OK, else the status."""
            request = pb.EmbedRequest(texts=TEXTS, idempotency_key=f"pool{max_connections}-{i}")
            try:
                response = await stub.Embed(request, timeout=120)
            except grpc.aio.AioRpcError as err:
                return f"{err.code().name}: {err.details()}"
            assert len(response.embeddings) == len(TEXTS)
            return ""

        outcomes = await asyncio.gather(*(call(i) for i in range(CALLS)))
    failures = [o for o in outcomes if o]
    assert not failures, f"{len(failures)} of {CALLS} failed, e.g. {failures[:3]}"
