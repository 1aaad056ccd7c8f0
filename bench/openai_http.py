"""One-text embedding latency at concurrency 1: gRPC Embed vs the OpenAI-compatible HTTP
endpoint (`python -m bench.openai_http`, against a running `taskmux up`).

Three callers, one call at a time each, on one kept-alive connection each, interleaved in
rounds so that drift on a shared machine hits them alike:

  grpc     the generated stub's Embed (no retries, no idempotency key)
  http     POST /v1/embeddings with http.client, `encoding_format` float
  openai   the `openai` package's client (it asks for base64 and decodes it)

Every call embeds a text no call embedded before. Prints milliseconds per call (p50, p90,
p99, mean) as JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc
from openai import OpenAI
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

Call = Callable[[str], None]


def grpc_caller(target: str) -> Call:
    stub = taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(target))

    def call(text: str) -> None:
        stub.Embed(pb.EmbedRequest(texts=[text]), timeout=30)

    return call


def http_caller(addr: str) -> Call:
    host, _, port = addr.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def call(text: str) -> None:
        body = json.dumps({"input": text, "model": "embed"})
        connection.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")

    return call


def openai_caller(addr: str) -> Call:
    client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0)

    def call(text: str) -> None:
        client.embeddings.create(model="embed", input=text)

    return call


def measure(callers: dict[str, Call], calls: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Milliseconds per call of each caller, `calls` each in `rounds` interleaved rounds."""
    for name, call in callers.items():
        for i in range(warmup):
            call(f"warm-up {name} {i}")
    samples: dict[str, list[float]] = {name: [] for name in callers}
    per_round = calls // rounds
    for r in range(rounds):
        for name, call in callers.items():
            for i in range(per_round):
                text = f"latency probe {name} round {r} call {i}: the quick brown fox"
                start = time.perf_counter()
                call(text)
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: _summary(values) for name, values in samples.items()}


def _summary(ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(ms, n=100)
    return {
        "calls": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p90_ms": round(cuts[89], 2),
        "p99_ms": round(cuts[98], 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway gRPC address")
    parser.add_argument("--http", default="127.0.0.1:8080", help="gateway HTTP address")
    parser.add_argument("--calls", type=int, default=200, help="calls per caller")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    callers = {
        "grpc": grpc_caller(args.target),
        "http": http_caller(args.http),
        "openai": openai_caller(args.http),
    }
    print(json.dumps(measure(callers, args.calls, args.rounds, args.warmup), indent=2))


if __name__ == "__main__":
    main()
