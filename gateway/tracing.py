"""The gateway's server span: one per call, the root of the call's trace.

Its children are the dispatcher's `enqueue <head>` (whose context the jobs carry to the
workers) and `await reply` spans. Attributes name the method, the heads, the client's
request id and the tenant; never texts, labels or keys.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Final

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind

from gateway.auth import caller
from taskmux.tracing import Tracing, status_of

SERVICE: Final = "taskmux.v1.TaskMux"
MAX_ATTRIBUTE_CHARS: Final = 128
Ctx = grpc.aio.ServicerContext[Any, Any]


def traced(tracing: Tracing, rpc: str, handler: Any, *, streaming: bool) -> Any:
    """`handler` (unary or server-streaming) inside a server span; itself when tracing is off."""
    if not tracing.enabled:
        return handler
    if streaming:

        @functools.wraps(handler)
        async def stream_wrapper(request: Any, context: Ctx) -> AsyncIterator[Any]:
            with _server_span(tracing, rpc, request, context):
                async for item in handler(request, context):
                    yield item

        return stream_wrapper

    @functools.wraps(handler)
    async def wrapper(request: Any, context: Ctx) -> Any:
        with _server_span(tracing, rpc, request, context):
            return await handler(request, context)

    return wrapper


@contextmanager
def _server_span(tracing: Tracing, rpc: str, request: Any, context: Ctx) -> Iterator[Span]:
    # A root: clients' trace context is not taken from metadata (yet), so a client
    # cannot force every call to be sampled.
    span = tracing.start_span(
        f"{SERVICE}/{rpc}",
        kind=SpanKind.SERVER,
        parent=Context(),
        attributes=_attributes(rpc, request),
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    code = grpc.StatusCode.UNKNOWN
    try:
        yield span
        code = grpc.StatusCode.OK
    finally:
        otel_context.detach(token)
        set_code = context.code()  # set when the handler aborted with a status
        if isinstance(set_code, grpc.StatusCode):
            code = set_code
        elif code is grpc.StatusCode.UNKNOWN and context.cancelled():
            code = grpc.StatusCode.CANCELLED
        status_of(span, code.value[0], code.name)
        span.end()


def _attributes(rpc: str, request: Any) -> dict[str, str | int | list[str]]:
    attributes: dict[str, str | int | list[str]] = {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": rpc,
    }
    head = getattr(request, "head", None)
    if isinstance(head, str) and head:
        attributes["taskmux.head"] = head[:MAX_ATTRIBUTE_CHARS]
    heads = getattr(request, "heads", None)
    if heads is not None and not isinstance(heads, str):
        attributes["taskmux.heads"] = [str(h)[:MAX_ATTRIBUTE_CHARS] for h in list(heads)[:16]]
    request_id = getattr(request, "request_id", None)
    if isinstance(request_id, str) and request_id:
        attributes["taskmux.request_id"] = request_id[:MAX_ATTRIBUTE_CHARS]
    texts = getattr(request, "texts", None)
    if texts is not None and not isinstance(texts, str):
        attributes["taskmux.texts"] = len(texts)  # how many, never what
    if (tenant := caller()) is not None:  # set by the API-key interceptor, outside us
        attributes["taskmux.tenant"] = tenant.name
    return attributes
