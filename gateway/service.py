"""The TaskMux gRPC servicer: validate, dispatch, decode. Nothing else lives here."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.catalog import CatalogWatcher
from gateway.dispatch import Dispatcher
from gateway.errors import Unavailable, grpc_status
from gateway.settings import GatewaySettings
from gateway.validation import check_head, check_texts, check_top_k
from router.messages import KIND_CLASSIFY, KIND_EMBED
from taskmux.modelrepo.manifest import KIND_CLASSIFICATION, KIND_EMBEDDING, HeadSpec
from taskmux.v1 import taskmux_pb2 as pb
from taskmux.v1 import taskmux_pb2_grpc

EMBED_HEAD = "embed"
HEAD_KINDS = {
    KIND_EMBEDDING: pb.HEAD_KIND_EMBEDDING,
    KIND_CLASSIFICATION: pb.HEAD_KIND_CLASSIFICATION,
}

Ctx = grpc.aio.ServicerContext[Any, Any]


class TaskMuxService(taskmux_pb2_grpc.TaskMuxServicer):
    """Implements taskmux.v1.TaskMux on top of the dispatcher and the catalog."""

    def __init__(
        self, settings: GatewaySettings, dispatcher: Dispatcher, watcher: CatalogWatcher
    ) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._watcher = watcher

    @grpc_status
    async def Embed(self, request: pb.EmbedRequest, context: Ctx) -> pb.EmbedResponse:
        texts = check_texts(request.texts, self._settings)
        self._require_redis()
        body = await self._dispatcher.run(
            kind=KIND_EMBED,
            head=EMBED_HEAD,
            texts=texts,
            top_k=1,
            time_remaining_s=context.time_remaining(),
        )
        return pb.EmbedResponse.FromString(body)

    @grpc_status
    async def Classify(self, request: pb.ClassifyRequest, context: Ctx) -> pb.ClassifyResponse:
        texts = check_texts(request.texts, self._settings)
        self._require_redis()
        head = check_head(request.head, KIND_CLASSIFICATION, self._watcher.catalog, "Classify")
        body = await self._dispatcher.run(
            kind=KIND_CLASSIFY,
            head=head.name,
            texts=texts,
            top_k=check_top_k(request.top_k, head),
            time_remaining_s=context.time_remaining(),
        )
        return pb.ClassifyResponse.FromString(body)

    @grpc_status
    async def ListTasks(self, request: pb.ListTasksRequest, context: Ctx) -> pb.ListTasksResponse:
        self._require_redis()
        catalog = self._watcher.catalog
        if catalog is None:
            raise Unavailable("no worker has registered its heads yet: start a worker, then retry")
        encoder = catalog.encoder
        s = self._settings
        return pb.ListTasksResponse(
            heads=[_head_info(h) for h in sorted(catalog.heads, key=lambda h: h.name)],
            encoder=pb.EncoderInfo(
                name=encoder.name,
                version=encoder.version,
                dimension=encoder.dimension,
                max_sequence_length=encoder.max_sequence_length,
            ),
            limits=pb.RequestLimits(
                max_texts_per_request=s.max_texts_per_request,
                max_text_chars=s.max_text_chars,
                default_timeout_ms=s.default_timeout_ms,
            ),
        )

    def _require_redis(self) -> None:
        if not self._watcher.redis_ok:
            raise Unavailable("the task queue (Redis) is unreachable; retry shortly")


def _head_info(head: HeadSpec) -> pb.HeadInfo:
    return pb.HeadInfo(
        name=head.name,
        kind=HEAD_KINDS.get(head.kind, pb.HEAD_KIND_UNSPECIFIED),
        labels=list(head.labels),
        version=head.version,
        metrics=head.metrics,
        description=head.description,
    )
