"""Building and running the gRPC server, with staged start and stop."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace.export import SpanExporter
from taskmux_api.v1 import taskmux_pb2

from gateway.auth import KeysFile, auth_interceptors
from gateway.catalog import CatalogWatcher
from gateway.dispatch import Dispatcher
from gateway.errors import deferred_decode
from gateway.idempotency import Idempotency
from gateway.limits import Limiter
from gateway.memory import MemoryGuard
from gateway.metrics import GatewayMetrics
from gateway.openai_http import OpenAIEmbeddings, OpenAIHttp
from gateway.replies import READ_BLOCK_MS, ReplyRouter
from gateway.service import TaskMuxService
from gateway.settings import GatewaySettings
from gateway.tls import add_port
from gateway.tracing import traced
from router.connection import connect
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
        )
        idempotency = Idempotency(redis, ttl_s=settings.idempotency_ttl_s)
        memory = await stack.enter_async_context(
            MemoryGuard(
                redis,
                high_water=settings.redis_memory_high_water,
                interval_ms=settings.monitor_interval_ms,
            )
        )
        server = grpc.aio.server(
            interceptors=auth_interceptors(settings.api_keys_file),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_connection_age_ms", settings.max_connection_age_s * 1000),
                ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace_s * 1000),
            ],
        )
        metrics = GatewayMetrics(
            lambda: {h.name for h in watcher.catalog.heads} if watcher.catalog else set(),
            lambda: watcher.reconnects,
        )
        stack.enter_context(metrics_endpoint(settings.metrics_addr, metrics.registry))
        service = TaskMuxService(settings, dispatcher, watcher, idempotency, Limiter(redis), memory)
        add_service(service, server, metrics, tracing)
        health.add_to(server)
        reflection.enable_server_reflection(
            [
                taskmux_pb2.DESCRIPTOR.services_by_name["TaskMux"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        port = add_port(server, settings)
        await server.start()
        keys = KeysFile(Path(settings.api_keys_file)) if settings.api_keys_file else None
        openai = OpenAIEmbeddings(service, watcher, keys, metrics, tracing)
        http = await stack.enter_async_context(OpenAIHttp(settings, openai))
        await health.set_started()
        log.info("gateway %s listening on port %d", settings.gateway_id, port)
        await stop.wait()
        log.info("stopping: NOT_SERVING, draining for up to %ds", settings.drain_timeout_s)
        await health.stop()
        await asyncio.gather(server.stop(settings.drain_timeout_s), http.drain())


HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(
    service: TaskMuxService,
    server: grpc.aio.Server,
    metrics: GatewayMetrics | None = None,
    tracing: Tracing | None = None,
) -> None:
    """Register every TaskMux method, as the generated code does, but with requests that
    fail to parse handed to the handler (`deferred_decode`) to answer INVALID_ARGUMENT."""
    handlers = {}
    for method in taskmux_pb2.DESCRIPTOR.services_by_name["TaskMux"].methods:
        factory = HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        request_type = getattr(taskmux_pb2, method.input_type.name)
        response_type = getattr(taskmux_pb2, method.output_type.name)
        handler = getattr(service, method.name)
        if metrics is not None:
            handler = metrics.instrument(method.name, handler, streaming=method.server_streaming)
        if tracing is not None:
            handler = traced(tracing, method.name, handler, streaming=method.server_streaming)
        handlers[method.name] = factory(
            handler,
            request_deserializer=deferred_decode(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # Missing from grpc-stubs; the generated code registers the same way.
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
