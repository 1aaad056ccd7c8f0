"""Redis connections: many more calls in flight than pooled connections still all succeed."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest
from redis.asyncio.connection import UnixDomainSocketConnection
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from router.connection import RedisSettings, connect
from taskmux.local import free_port, redis_command, wait_for_redis
from tests.harness import Cluster, wait_for_catalog

pytestmark = pytest.mark.integration

CALLS = 500
TEXTS = [f"t{i}" for i in range(8)]


@pytest.mark.parametrize("scheme", ["unix", "UNIX"])  # a URL's scheme has no case
def test_a_unix_socket_url_reaches_redis(scheme: str) -> None:
    """unix:// is a TASKMUX_REDIS_URL scheme, for a Redis on the same host. The client
    options once carried TCP keepalive, which a Unix connection refuses: every command
    failed with a TypeError, and the gateway and worker exited at start."""
    # A short path: a Unix socket's must fit in 104 bytes.
    with tempfile.TemporaryDirectory(prefix="tmx-") as folder:
        socket_path = Path(folder) / "valkey.sock"
        argv = redis_command(free_port(), Path(folder))
        argv += ["--unixsocket", str(socket_path), "--unixsocketperm", "700"]
        valkey = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_redis(f"unix://{socket_path}")
            asyncio.run(_stream_round_trip(f"{scheme}://{socket_path}"))
        finally:
            valkey.terminate()
            valkey.wait(30)


async def _stream_round_trip(url: str) -> None:
    """A consumer group reads back what was added, through `connect`'s client."""
    client = connect(RedisSettings.from_env({"TASKMUX_REDIS_URL": url}), block_ms=100)
    try:
        assert client.connection_pool.connection_class is UnixDomainSocketConnection
        await client.xgroup_create("s", "g", id="0", mkstream=True)
        await client.xadd("s", {"f": "v"})
        read = await client.xreadgroup("g", "c", {"s": ">"}, count=1, block=100)
        assert read[0][1][0][1] == {b"f": b"v"}
    finally:
        await client.aclose()


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
