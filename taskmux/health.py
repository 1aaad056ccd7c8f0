"""gRPC health (`grpc.health.v1`) as every taskmux process reports it.

Services a probe can ask for:
    ""           readiness: SERVING only while the process can do its work (Redis answers,
                 and for workers the model is loaded). Kubernetes readiness probes use it.
    "liveness"   SERVING while the process runs; it never depends on Redis, so a Redis
                 outage does not get healthy pods restarted. Liveness probes use it.
    "started"    SERVING once start-up is done (a worker's model is loaded), whatever
                 Redis does: startup probes use it, so a Redis outage never gets
                 starting pods killed, and a model load that hangs does.
Gateways also report readiness under their API's name, "taskmux.v1.TaskMux".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

log = logging.getLogger(__name__)

LIVENESS = "liveness"
STARTED = "started"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """The health servicer plus the readiness flag it publishes."""

    def __init__(self, ready_services: Sequence[str] = ("",)) -> None:
        self.servicer = HealthServicer()
        self.ready = False
        self._ready_services = tuple(ready_services)

    async def start(self) -> None:
        """Alive, not yet ready."""
        await self.servicer.set(LIVENESS, SERVING)
        await self.servicer.set(STARTED, NOT_SERVING)
        await self.set_ready(False)

    async def set_started(self) -> None:
        """Start-up is done: the startup probe passes from now on."""
        await self.servicer.set(STARTED, SERVING)

    async def set_ready(self, ready: bool) -> None:
        """Publish readiness on every readiness service name."""
        self.ready = ready
        for service in self._ready_services:
            await self.servicer.set(service, SERVING if ready else NOT_SERVING)

    async def stop(self) -> None:
        """Everything NOT_SERVING from now on (draining)."""
        await self.servicer.enter_graceful_shutdown()

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve the health service on `server`."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    @contextlib.asynccontextmanager
    async def serving_alone(self, addr: str) -> AsyncIterator[int]:
        """Serve health alone, in plaintext on `addr`, for the block (yields the port):
        the worker's only port, and the gateway's probe port, since kubelet's gRPC
        probes cannot speak the TLS its API port may require."""
        server = grpc.aio.server()
        self.add_to(server)
        port = server.add_insecure_port(addr)
        await server.start()
        log.info("health service on port %d (plaintext, health only)", port)
        try:
            yield port
        finally:
            await server.stop(1)
