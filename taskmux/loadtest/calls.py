"""Request messages built before the run, and the one function that sends them.

Building every protobuf message up front keeps the client's own cost per call to a stub
lookup and a send, so that the figures measure the service rather than the load generator.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_client.channel import Metadata

from taskmux.loadtest.config import (
    DEFAULT_ENTITIES_HEAD,
    DEFAULT_ZERO_SHOT_LABELS,
    LoadConfig,
    MixEntry,
)
from taskmux.loadtest.schedule import cumulative
from taskmux.loadtest.texts import TextGenerator

# Channel options: a local subchannel pool gives every channel its own TCP connection
# (gRPC otherwise shares one between channels to the same target); no transparent
# retries, so every failure is seen; round robin over every address the target resolves to.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.lb_policy_name", "round_robin"),
)

OK = "OK"
CLIENT_ERROR = "CLIENT_ERROR"  # an exception that is not a gRPC status (a client bug)


@dataclass(frozen=True)
class PreparedTask:
    """One mix entry with its requests built: what to call and with what."""

    label: str
    rpc: str  # the TaskMux method name, e.g. "Classify"
    streaming: bool  # server-streaming (Analyze): the call ends when the stream does
    texts: int  # texts per request, counted for texts/s (a query counts as one)
    requests: tuple[Message, ...]


def prepare_tasks(config: LoadConfig) -> tuple[PreparedTask, ...]:
    """Build `distinct_requests` requests for every mix entry, seeded by `config.seed`."""
    generator = TextGenerator(config.seed)
    rng = random.Random(config.seed + 1)
    sizes = [words for words, _ in config.lengths]
    cum_weights = cumulative([weight for _, weight in config.lengths])

    def texts(n: int) -> list[str]:
        return [generator.text(w) for w in rng.choices(sizes, cum_weights=cum_weights, k=n)]

    return tuple(_prepare(entry, config, texts) for entry in config.mix)


def _prepare(
    entry: MixEntry, config: LoadConfig, texts: Callable[[int], list[str]]
) -> PreparedTask:
    n = config.texts_per_request
    count = config.distinct_requests
    rpc, streaming, texts_per = _RPC[entry.task], entry.task == "analyze", n
    requests: list[Message] = []
    for _ in range(count):
        if entry.task == "embed":
            requests.append(pb.EmbedRequest(texts=texts(n)))
        elif entry.task == "classify":
            requests.append(pb.ClassifyRequest(head=entry.args[0], texts=texts(n)))
        elif entry.task == "entities":
            head = entry.args[0] if entry.args else DEFAULT_ENTITIES_HEAD
            requests.append(pb.ExtractEntitiesRequest(head=head, texts=texts(n)))
        elif entry.task == "similarity":
            query, *candidates = texts(1 + entry.candidates)
            texts_per = 1 + entry.candidates
            requests.append(pb.SimilarityRequest(query=query, candidates=candidates))
        elif entry.task == "zero-shot":
            labels = entry.args or DEFAULT_ZERO_SHOT_LABELS
            requests.append(pb.ZeroShotClassifyRequest(texts=texts(n), labels=labels))
        else:
            requests.append(pb.AnalyzeRequest(texts=texts(n), heads=entry.args))
    return PreparedTask(entry.label, rpc, streaming, texts_per, tuple(requests))


_RPC = {
    "embed": "Embed",
    "classify": "Classify",
    "entities": "ExtractEntities",
    "similarity": "Similarity",
    "zero-shot": "ZeroShotClassify",
    "analyze": "Analyze",
}


# A bound stub method of the task's RPC: unary-unary or unary-stream multicallable.
Method = Callable[..., Any]


def bind(
    channel: grpc.aio.Channel, tasks: tuple[PreparedTask, ...], metadata: Metadata = ()
) -> tuple[Method, ...]:
    """Each task's stub method on `channel`, looked up once, sending `metadata` if any."""
    from taskmux_api.v1 import taskmux_pb2_grpc

    stub = taskmux_pb2_grpc.TaskMuxStub(channel)
    methods = [getattr(stub, task.rpc) for task in tasks]
    if metadata:
        methods = [functools.partial(method, metadata=metadata) for method in methods]
    return tuple(methods)


def keyed(request: Message) -> Message:
    """A copy of `request` with a fresh idempotency key: one logical call, as the default
    client (taskmux_client) makes every call. The prebuilt request is left as it is."""
    copy = type(request)(idempotency_key=uuid.uuid4().hex)
    copy.MergeFrom(request)  # the prebuilt request has no key, so the fresh one stays
    return copy


async def invoke(method: Method, request: Message, streaming: bool, deadline_s: float) -> None:
    """Send one request and wait for its whole answer; raises grpc.aio.AioRpcError."""
    call = method(request, timeout=deadline_s)
    if streaming:
        async for _ in call:
            pass
    else:
        await call


async def outcome(
    method: Method, request: Message, streaming: bool, deadline_s: float
) -> tuple[str, str]:
    """(status name, details) of one call: ("OK", "") or e.g. ("UNAVAILABLE", "...")."""
    try:
        await invoke(method, request, streaming, deadline_s)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    except Exception as err:  # counted and reported, never hidden
        return CLIENT_ERROR, f"{type(err).__name__}: {err}"
    return OK, ""
