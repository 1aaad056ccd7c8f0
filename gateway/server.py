"""Building and running the gRPC server, with staged start and stop."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace.export import SpanExporter
from redis.asyncio import Redis
from taskmux_api.v1 import taskmux_pb2, taskmux_pb2_grpc

from gateway.auth import ApiKeys, api_keys
from gateway.catalog import CatalogWatcher
from gateway.dispatch import Dispatcher
from gateway.errors import deferred_decode, statuses
from gateway.handlers import Layer, stacked
from gateway.idempotency import Idempotency
from gateway.limits import Limiter
from gateway.memory import MemoryGuard
from gateway.metrics import GatewayMetrics
from gateway.openai_http import OpenAIEmbeddings, OpenAIHttp
from gateway.replies import READ_BLOCK_MS, ReplyRouter
from gateway.service import TaskMuxService
from gateway.settings import GatewaySettings
from gateway.tls import add_port
from gateway.tracing import server_spans
from router.connection import connect
from router.payload import log_at_rest
from taskmux.health import Health
from taskmux.metrics import metrics_endpoint
from taskmux.tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = "taskmux.v1.TaskMux"


async def serve(
    settings: GatewaySettings, stop: asyncio.Event, *, span_exporter: SpanExporter | None = None
) -> None:
    """Serve until `stop` is set; then refuse new calls and let in-flight ones finish.

    `span_exporter` turns tracing on with that exporter, whatever the settings say.
    """
    async with AsyncExitStack() as stack:
        # First in, last out: spans of calls that finish while draining are still exported.
        tracing = stack.enter_context(
            Tracing(
                settings.trace,
                service="taskmux-gateway",
                instance=settings.gateway_id,
                exporter=span_exporter,
            )
        )
        redis = connect(settings.redis, block_ms=READ_BLOCK_MS)
        stack.push_async_callback(redis.aclose)
        health = Health(("", SERVICE_NAME))
        if settings.health_addr:  # entered early, so it stops after the API drains
            await stack.enter_async_context(health.serving_alone(settings.health_addr))
        service, watcher = await _service(stack, settings, redis, health, tracing)
        metrics = GatewayMetrics(
            lambda: {h.name for h in watcher.catalog.heads} if watcher.catalog else set(),
            lambda: watcher.reconnects,
        )
        stack.enter_context(metrics_endpoint(settings.metrics_addr, metrics.registry))
        # One stack for both ports: an HTTP call is counted, traced, answered and
        # authenticated by the very layers a gRPC call is.
        layers = handler_stack(metrics, tracing, api_keys(settings.api_keys_file))
        server = _grpc_server(settings, service, layers, health)
        port = add_port(server, settings)
        await server.start()
        openai = OpenAIEmbeddings(service, watcher, layers)
        http = await stack.enter_async_context(OpenAIHttp(settings, openai))
        await health.set_started()
        log.info("gateway %s listening on port %d", settings.gateway_id, port)
        await stop.wait()
        log.info("stopping: NOT_SERVING, draining for up to %ds", settings.drain_timeout_s)
        await health.stop()
        await asyncio.gather(server.stop(settings.drain_timeout_s), http.drain())


async def _service(
    stack: AsyncExitStack,
    settings: GatewaySettings,
    redis: Redis,
    health: Health,
    tracing: Tracing,
) -> tuple[TaskMuxService, CatalogWatcher]:
    """The servicer and what it runs on, each started on `stack` (stopped in reverse)."""
    replies = await stack.enter_async_context(
        ReplyRouter(
            redis,
            settings.gateway_id,
            ttl_s=settings.reply_ttl_s,
            keep_alive_interval_s=settings.monitor_interval_ms / 1000,
        )
    )
    watcher = await stack.enter_async_context(
        CatalogWatcher(redis, health, interval_ms=settings.monitor_interval_ms)
    )
    await watcher.first_check()  # so the first calls see the real Redis state
    dispatcher = Dispatcher(
        redis,
        replies,
        default_timeout_ms=settings.default_timeout_ms,
        max_backlog=settings.max_backlog,
        retry_after_ms=settings.backlog_retry_after_ms,
        tracing=tracing,
        cipher=settings.payload_cipher,
    )
    idempotency = await stack.enter_async_context(
        Idempotency(redis, ttl_s=settings.idempotency_ttl_s, cipher=settings.payload_cipher)
    )
    log_at_rest(log, settings.payload_cipher)
    memory = await stack.enter_async_context(
        MemoryGuard(
            redis,
            high_water=settings.redis_memory_high_water,
            interval_ms=settings.monitor_interval_ms,
        )
    )
    service = TaskMuxService(settings, dispatcher, watcher, idempotency, Limiter(redis), memory)
    return service, watcher


def _grpc_server(
    settings: GatewaySettings, service: TaskMuxService, layers: list[Layer], health: Health
) -> grpc.aio.Server:
    """The gRPC server with TaskMux (inside `layers`), health and reflection; not started."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_connection_age_ms", settings.max_connection_age_s * 1000),
            ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_s * 1000),
        ],
    )
    add_service(service, server, layers)
    health.add_to(server)
    reflection.enable_server_reflection(
        [
            taskmux_pb2.DESCRIPTOR.services_by_name["TaskMux"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return server


HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def handler_stack(metrics: GatewayMetrics, tracing: Tracing, keys: ApiKeys | None) -> list[Layer]:
    """The layers of every TaskMux call, outermost first (see gateway/handlers.py): metrics
    and tracing outside the statuses layer, so they see the status each call ends with,
    and outside auth, so refused calls are counted and traced too."""
    layers = [metrics.observe, server_spans(tracing), statuses, keys]
    return [layer for layer in layers if layer is not None]


def _method(service: TaskMuxService | taskmux_pb2_grpc.TaskMuxServicer, rpc: str) -> Any:
    """The servicer's handler for `rpc`: TaskMuxService maps unary tasks to planners."""
    if isinstance(service, TaskMuxService):
        return service.method(rpc)
    return getattr(service, rpc)


def add_service(
    service: TaskMuxService | taskmux_pb2_grpc.TaskMuxServicer,
    server: grpc.aio.Server,
    layers: list[Layer],
) -> None:
    """Register every TaskMux method inside `layers`, as the generated code does, but with
    requests that fail to parse handed on (`deferred_decode`) to answer INVALID_ARGUMENT."""
    handlers = {}
    for method in taskmux_pb2.DESCRIPTOR.services_by_name["TaskMux"].methods:
        factory = HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        request_type = getattr(taskmux_pb2, method.input_type.name)
        response_type = getattr(taskmux_pb2, method.output_type.name)
        handlers[method.name] = factory(
            stacked(method, _method(service, method.name), layers),
            request_deserializer=deferred_decode(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # Missing from grpc-stubs; the generated code registers the same way.
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
