"""The gateway's server span: one per call, the root of the call's trace.

Its children are the dispatcher's `enqueue <head>` (whose context the jobs carry to the
workers) and `await reply` spans. Attributes name the method, the heads, the client's
request id and the tenant; never texts, labels or keys. The span sits outside the API-key
layer (gateway/handlers.py), so a refused call has a span too, with its status.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from gateway.handlers import Call, Layer
from taskmux.tracing import Tracing, status_of

SERVICE: Final = "taskmux.v1.TaskMux"
MAX_ATTRIBUTE_CHARS: Final = 128


def server_spans(tracing: Tracing) -> Layer | None:
    """The handler-stack layer that runs each call inside a server span; None when off."""
    if not tracing.enabled:
        return None
    return functools.partial(_server_span, tracing)


@contextlib.asynccontextmanager
async def _server_span(tracing: Tracing, call: Call) -> AsyncIterator[None]:
    # A root: clients' trace context is not taken from metadata (yet), so a client
    # cannot force every call to be sampled.
    span = tracing.start_span(
        f"{SERVICE}/{call.rpc}",
        kind=SpanKind.SERVER,
        parent=Context(),
        attributes=_attributes(call.rpc, call.request),
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    returned = False
    try:
        yield
        returned = True
    finally:
        otel_context.detach(token)
        if call.tenant:  # found by the API-key layer, inside this one
            span.set_attribute("taskmux.tenant", call.tenant)
        code = call.status(returned=returned)
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
    return attributes
