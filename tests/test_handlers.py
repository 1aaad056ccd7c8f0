"""The handler stack (gateway/handlers.py) on a real in-process gRPC server: every method
shape, Pipeline included, ends with the status of what it raised, and is counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.errors import REQUEST_ID_METADATA, InvalidArgument, statuses
from gateway.metrics import GatewayMetrics
from gateway.server import add_service

SECRET = "a detail no client may see"


class Failing(taskmux_pb2_grpc.TaskMuxServicer):
    """A servicer whose Embed, Analyze and Pipeline fail as a bug or a refusal would."""

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        raise RuntimeError(SECRET)

    async def Analyze(
        self, request: pb.AnalyzeRequest, context: Any
    ) -> AsyncIterator[pb.AnalyzeResult]:
        yield pb.AnalyzeResult(text_index=0)
        raise InvalidArgument("the second result is refused")

    async def Pipeline(
        self, requests: AsyncIterator[pb.PipelineRequest], context: Any
    ) -> AsyncIterator[pb.PipelineResponse]:
        async for request in requests:
            yield pb.PipelineResponse(id=request.id)
            raise RuntimeError(SECRET)


@dataclass
class Served:
    channel: grpc.aio.Channel
    stub: taskmux_pb2_grpc.TaskMuxStub
    metrics: GatewayMetrics

    async def count(self, rpc: str, code: str) -> float | None:
        """The calls of `rpc` counted with `code` (head ""), once counted: the handler
        stack counts a call as it leaves, which can be just after the client has its
        status, so this waits up to 2 s for the sample to appear."""
        labels = {"rpc": rpc, "head": "", "code": code}
        for _ in range(100):
            value = self.metrics.registry.get_sample_value("taskmux_gateway_requests_total", labels)
            if value is not None:
                return value
            await asyncio.sleep(0.02)
        return None


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    metrics = GatewayMetrics(lambda: set(), lambda: 0)
    server = grpc.aio.server()
    add_service(Failing(), server, [metrics.observe, statuses])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(channel, taskmux_pb2_grpc.TaskMuxStub(channel), metrics)
    finally:
        await server.stop(None)


async def _until_error(stream: Any) -> tuple[list[Any], grpc.aio.AioRpcError]:
    """The messages a stream sent before it failed, and its error."""
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in stream:
            received.append(message)
    return received, info.value


async def test_a_bug_in_a_unary_call_is_internal_with_a_fixed_message(
    served: Served,
) -> None:
    stub = served.stub
    call = stub.Embed(pb.EmbedRequest(texts=["x"], request_id="req-1"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert (info.value.details() or "").startswith("internal error (ref ")
    assert SECRET not in (info.value.details() or "")
    assert (REQUEST_ID_METADATA, "req-1") in tuple(await call.trailing_metadata() or ())
    assert await served.count("Embed", "INTERNAL") == 1


async def test_a_server_stream_ends_with_its_error_after_what_it_sent(
    served: Served,
) -> None:
    stub = served.stub
    received, error = await _until_error(
        stub.Analyze(pb.AnalyzeRequest(texts=["x"], heads=["embed"]))
    )
    assert len(received) == 1
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the second result is refused"
    assert await served.count("Analyze", "INVALID_ARGUMENT") == 1


async def test_a_bug_in_pipeline_is_internal_not_grpcs_default(
    served: Served,
) -> None:
    stub = served.stub
    requests = [pb.PipelineRequest(id="1", embed=pb.EmbedRequest(texts=["x"]))]
    received, error = await _until_error(stub.Pipeline(iter(requests)))
    assert [r.id for r in received] == ["1"]
    assert error.code() == grpc.StatusCode.INTERNAL  # grpcio's own would be UNKNOWN
    assert (error.details() or "").startswith("internal error (ref ")
    assert SECRET not in (error.details() or "")
    assert await served.count("Pipeline", "INTERNAL") == 1


async def test_a_request_that_does_not_parse_is_invalid_argument(
    served: Served,
) -> None:
    raw = served.channel.unary_unary("/taskmux.v1.TaskMux/Embed")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\x0a\x02\xff\xfe")  # texts = [invalid UTF-8]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await served.count("Embed", "INVALID_ARGUMENT") == 1
