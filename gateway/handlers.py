"""The handler stack: the layers every TaskMux call runs inside, applied once per method.

    metrics and access log   gateway/metrics.py   every call counted, refusals included
    └─ server span           gateway/tracing.py   when tracing is on
       └─ statuses           gateway/errors.py    the one place errors become statuses
          └─ API keys        gateway/auth.py      when a keys file is set
             └─ the servicer method               gateway/service.py

A layer is an async context manager made from the call's `Call` and held for the call's
whole life: a unary call until its response, a streaming one until its last message.
Unary, server-streaming and bidi methods (Pipeline) run the same layers in the same
order; only how the handler is called differs. Auth sits inside the statuses layer, so
its refusals become statuses there, and inside metrics and tracing, so they are counted
and traced like any other outcome. Health and reflection are other services: no layer
applies to them. The OpenAI-compatible HTTP port (gateway/openai_http.py) runs its calls
through these same layers, under an rpc name of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor

from gateway.errors import decoded

Ctx = grpc.aio.ServicerContext[Any, Any]
RequestCheck = Callable[[object], object]


@dataclass
class Call:
    """One call, as its layers see it and tell each other about it."""

    rpc: str  # the method's name: "Embed", "Pipeline"
    context: Ctx
    request: object = None  # the request (possibly `Undecodable`); None for a client stream
    tenant: str = ""  # the caller's tenant, once the API-key layer has found it
    # Run on each request of a client stream before the handler reads it; a check that
    # raises ends the call with that error's status.
    request_checks: list[RequestCheck] = field(default_factory=list)

    def status(self, *, returned: bool) -> grpc.StatusCode:
        """The call's status as a layer exits: the one it was ended with; else OK if the
        handler `returned`, CANCELLED if the client went away, UNKNOWN otherwise."""
        code = self.context.code()  # set once the statuses layer (or grpc) ended the call
        if isinstance(code, grpc.StatusCode):
            return code
        if returned:
            return grpc.StatusCode.OK
        return grpc.StatusCode.CANCELLED if self.context.cancelled() else grpc.StatusCode.UNKNOWN


Layer = Callable[[Call], AbstractAsyncContextManager[None]]


def stacked(method: MethodDescriptor, handler: Any, layers: list[Layer], *, rpc: str = "") -> Any:
    """`handler` (a bound servicer method of `method`'s shape) inside `layers`, outermost
    first; its calls are named `rpc` in metrics, logs and spans (default: the method's name)."""
    rpc = rpc or method.name
    if method.client_streaming:

        async def bidi(requests: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
            call = Call(rpc, context)
            async with _entered(layers, call):
                async for response in handler(_checked(requests, call), context):
                    yield response

        return bidi
    if method.server_streaming:

        async def server_streaming(request: Any, context: Ctx) -> AsyncIterator[Any]:
            call = Call(rpc, context, request)
            async with _entered(layers, call):
                async for response in handler(decoded(request), context):
                    yield response

        return server_streaming

    async def unary(request: Any, context: Ctx) -> Any:
        call = Call(rpc, context, request)
        async with _entered(layers, call):
            return await handler(decoded(request), context)

    return unary


@contextlib.asynccontextmanager
async def _entered(layers: list[Layer], call: Call) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for layer in layers:
            await stack.enter_async_context(layer(call))
        yield


async def _checked(requests: AsyncIterator[Any], call: Call) -> AsyncIterator[Any]:
    async for request in requests:
        for check in call.request_checks:
            check(request)
        yield request
