"""The gateway's gRPC server: aged connections are replaced without failing a call."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.settings import GatewaySettings
from tests.harness import Cluster, wait_for_catalog

pytestmark = pytest.mark.integration

CALLERS = 4
RECONNECTS = 3


def test_connection_age_settings() -> None:
    defaults = GatewaySettings.from_env({})
    # The grace covers a call that started just before the age, up to the default deadline.
    assert defaults.max_connection_age_grace_s * 1000 >= defaults.default_timeout_ms
    env = {"TASKMUX_MAX_CONNECTION_AGE_S": "1", "TASKMUX_MAX_CONNECTION_AGE_GRACE_S": "5"}
    settings = GatewaySettings.from_env(env)
    assert (settings.max_connection_age_s, settings.max_connection_age_grace_s) == (1, 5)


async def test_calls_over_one_channel_survive_connection_ageing(
    cluster: Cluster, model_repo: Path
) -> None:
    """With a 1 s connection age the gateway asks the client to reconnect again and again;
    calls keep flowing over the one channel until it has reconnected three times, and
    every one of them succeeds."""
    _, address = cluster.start_gateway(max_connection_age_s="1", max_connection_age_grace_s="5")
    await asyncio.to_thread(wait_for_catalog, address, model_repo)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        connected = 0
        enough = asyncio.Event()
        failures: list[str] = []
        calls = 0

        async def watch() -> None:
            nonlocal connected
            state = channel.get_state(try_to_connect=True)
            while True:
                await channel.wait_for_state_change(state)
                state = channel.get_state()
                if state == grpc.ChannelConnectivity.READY:
                    connected += 1
                    if connected > RECONNECTS:  # the first connection, then the reconnects
                        enough.set()

        async def caller(n: int) -> None:
            nonlocal calls
            while not enough.is_set():
                request = pb.EmbedRequest(texts=[f"caller {n} call {calls}"])
                try:
                    await stub.Embed(request, timeout=60)
                except grpc.aio.AioRpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                calls += 1

        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(120):
                await asyncio.gather(*(caller(n) for n in range(CALLERS)))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    assert not failures, f"{len(failures)} of {calls} calls failed, e.g. {failures[:3]}"
    assert connected > RECONNECTS
