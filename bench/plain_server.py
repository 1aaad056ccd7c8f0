"""The bench's peer: a plain grpc.aio server over the same encoder, no queue, no batching.

What a team would write in an afternoon: one process, one ONNX Runtime session, each
Embed call encoded on its own as it arrives (on a worker thread, so the event loop keeps
taking calls), nothing between the call and the encoder. It serves only Embed, with the
same proto, so the bench's load generator drives it as it drives taskmux. Run as
`python -m bench.plain_server --repo model-repo --port N`.

With `--echo` it loads no encoder and answers every text with one fixed unit vector, on
the gateway's event loop (uvloop): what the gRPC server alone costs per call, the floor
under any Python gateway's.
"""

from __future__ import annotations

import os

# The same gRPC I/O paths as the gateway (gateway/__main__.py), so the comparison is
# about the queue and the batching, not gRPC's settings; read when grpc is imported.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")

import argparse
import asyncio
import math
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from taskmux_api.v1 import taskmux_pb2 as pb

from model.encoder import Encoder, l2_normalize
from model.loaded import LoadedModel
from model.manifest import load_manifest
from taskmux.lifecycle import run_process
from workers.settings import WorkerSettings

SERVICE = "taskmux.v1.TaskMux"


class PlainEmbed:
    """Embed only: encode the request's texts, answer."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder
        self._model = encoder.spec.name

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        pooled, _ = await asyncio.to_thread(self._encoder.encode, list(request.texts))
        vectors = l2_normalize(pooled)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v.tolist()) for v in vectors], model=self._model
        )


class EchoEmbed:
    """Embed answered from memory: the same unit vector for every text, no encoder."""

    def __init__(self, dimension: int) -> None:
        self._vector = [1.0 / math.sqrt(dimension)] * dimension

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=self._vector) for _ in request.texts], model="echo"
        )


async def serve(service: PlainEmbed | EchoEmbed, port: int) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    embed = grpc.unary_unary_rpc_method_handler(
        service.Embed,
        request_deserializer=pb.EmbedRequest.FromString,
        response_serializer=pb.EmbedResponse.SerializeToString,
    )
    server = grpc.aio.server()
    # Only Embed is served; every other RPC of the service answers UNIMPLEMENTED.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Embed": embed}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    """Entry point: the worker's settings (providers, threads, variant) pick the encoder."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--echo", action="store_true", help="no encoder: a fixed vector")
    args = parser.parse_args(argv)
    if args.echo:
        dimension = load_manifest(args.repo, verify=False).encoder.dimension
        run_process(serve(EchoEmbed(dimension), args.port))
        return 0
    settings = replace(WorkerSettings.from_env(os.environ), model_repo=args.repo)
    encoder = LoadedModel.load(settings).encoder
    asyncio.run(serve(PlainEmbed(encoder), args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
