"""The asyncio client: `AsyncTaskMuxClient`."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from taskmux_client._requests import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    Task,
    pipeline_request,
    texts_list,
    with_ids,
)
from taskmux_client._streams import async_enumerate, cancel
from taskmux_client.channel import (
    TLSConfig,
    auth_metadata,
    channel_credentials,
    channel_options,
    open_aio_channel,
)
from taskmux_client.retry import AttemptHook, RetryLoop, RetryPolicy, StreamRetry, final_error

Resp = TypeVar("Resp")


class AsyncTaskMuxClient:
    """A typed, asyncio taskmux client with deadlines and safe retries.

    Every call has a deadline (`timeout_s`, per call or from the constructor) that covers
    all its attempts. UNAVAILABLE, and RESOURCE_EXHAUSTED with a retry hint, are retried
    with jittered exponential backoff (`retry`); each retry sends the same request_id and
    idempotency_key, generated when the caller passes none, so the server computes a
    retried call once. Failures raise `taskmux_client.TaskMuxError` subclasses.

    `api_key` is sent as `authorization: Bearer <key>` on every call. `tls=True` connects
    with TLS trusting the system's CAs; a `TLSConfig` names a private CA and, for mutual
    TLS, a client certificate; `credentials` takes ready gRPC channel credentials instead.

    Close it with `await client.close()` or `async with`. (asyncio only: create it inside
    the event loop that uses it.)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
        tls: bool | TLSConfig = False,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        channel: grpc.aio.Channel | None = None,
        auto_idempotency_key: bool = True,
        on_attempt: AttemptHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._retry = retry or RetryPolicy()
        # Sent on every attempt of every call; kept out of reprs and error messages.
        self._metadata = auth_metadata(api_key)
        self._owns_channel = channel is None
        if channel is None:
            creds = channel_credentials(tls, credentials)
            channel = open_aio_channel(target, creds, channel_options(self._retry, options))
        elif tls is not False or credentials is not None:
            raise ValueError("tls and credentials secure a channel the client opens, not yours")
        self._channel = channel
        self._stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        self._timeout_s = timeout_s
        self._auto_key = auto_idempotency_key
        self._on_attempt = on_attempt
        self._rng = rng or random.Random()

    async def embed(
        self,
        texts: Sequence[str],
        *,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.EmbedResponse:
        """One L2-normalised embedding per text."""
        request = pb.EmbedRequest(texts=texts_list(texts))
        request = with_ids(request, request_id, idempotency_key, auto_key=self._auto_key)
        return await self._unary("Embed", self._stub.Embed, request, timeout_s)

    async def classify(
        self,
        head: str,
        texts: Sequence[str],
        *,
        top_k: int = 0,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.ClassifyResponse:
        """Each text's label from one classification head, with the top_k best labels."""
        request = pb.ClassifyRequest(head=head, texts=texts_list(texts), top_k=top_k)
        request = with_ids(request, request_id, idempotency_key, auto_key=self._auto_key)
        return await self._unary("Classify", self._stub.Classify, request, timeout_s)

    async def extract_entities(
        self,
        texts: Sequence[str],
        *,
        head: str = "",
        request_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.ExtractEntitiesResponse:
        """The entities of each text (head "entities" unless named), with offsets."""
        request = pb.ExtractEntitiesRequest(head=head, texts=texts_list(texts))
        request = with_ids(request, request_id, idempotency_key, auto_key=self._auto_key)
        return await self._unary("ExtractEntities", self._stub.ExtractEntities, request, timeout_s)

    async def similarity(
        self,
        query: str,
        candidates: Sequence[str],
        *,
        top_k: int = 0,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.SimilarityResponse:
        """The cosine of each candidate to the query, and the top_k best."""
        request = pb.SimilarityRequest(
            query=query, candidates=texts_list(candidates, "candidates"), top_k=top_k
        )
        request = with_ids(request, request_id, idempotency_key, auto_key=self._auto_key)
        return await self._unary("Similarity", self._stub.Similarity, request, timeout_s)

    async def zero_shot_classify(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        hypothesis_template: str = "",
        request_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.ZeroShotClassifyResponse:
        """Every label's probability for each text, best first."""
        request = pb.ZeroShotClassifyRequest(
            texts=texts_list(texts),
            labels=texts_list(labels, "labels"),
            hypothesis_template=hypothesis_template,
        )
        request = with_ids(request, request_id, idempotency_key, auto_key=self._auto_key)
        return await self._unary(
            "ZeroShotClassify",
            self._stub.ZeroShotClassify,
            request,
            timeout_s,
        )

    async def anonymize(
        self,
        texts: Sequence[str],
        *,
        labels: Sequence[str] = (),
        style: pb.AnonymizeStyle.ValueType = pb.ANONYMIZE_STYLE_PLACEHOLDER,
        head: str = "",
        request_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.AnonymizeResponse:
        """Each text with the entities of `labels` (PER, ORG, LOC when none) replaced by
        placeholders ("[PER]") or by pseudonyms consistent across the texts ("PER_1")."""
        request = pb.AnonymizeRequest(
            texts=texts_list(texts), labels=texts_list(labels, "labels"), style=style, head=head
        )
        request = with_ids(request, request_id, idempotency_key, auto_key=self._auto_key)
        return await self._unary("Anonymize", self._stub.Anonymize, request, timeout_s)

    async def list_tasks(self, *, timeout_s: float | None = None) -> pb.ListTasksResponse:
        """The heads, the encoder and the request limits."""
        request = pb.ListTasksRequest()
        return await self._unary("ListTasks", self._stub.ListTasks, request, timeout_s)

    async def analyze(
        self,
        texts: Sequence[str],
        heads: Sequence[str],
        *,
        top_k: int = 0,
        anonymize: pb.AnonymizeOptions | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[pb.AnalyzeResult]:
        """One result per (text, head) as each text is done, len(texts) x len(heads) in all.
        With `anonymize`, token-classification heads answer with their anonymized text.

        The call is retried like a unary one until its first result has arrived, not after.
        """
        request = pb.AnalyzeRequest(
            texts=texts_list(texts),
            heads=texts_list(heads, "heads"),
            top_k=top_k,
            anonymize=anonymize,
        )
        request = with_ids(request, request_id, idempotency_key, auto_key=self._auto_key)
        stream = StreamRetry(self._loop("Analyze", request.request_id, timeout_s))
        while True:
            call = self._stub.Analyze(
                request, timeout=stream.attempt_timeout_s(), metadata=self._metadata
            )
            try:
                async for result in call:
                    stream.succeeded()
                    yield result
                stream.succeeded()
                return
            except grpc.RpcError as err:
                await asyncio.sleep(stream.failed(err))
            finally:
                cancel(call)

    async def pipeline(
        self, tasks: Iterable[Task] | AsyncIterable[Task], *, timeout_s: float | None = None
    ) -> AsyncIterator[pb.PipelineResponse]:
        """Send tasks on one stream; yield each PipelineResponse as it completes.

        `tasks` may be PipelineRequests or plain task messages (EmbedRequest, ...; their
        ids are their positions, "0", "1", ...). A failed task is a response whose
        `error` is set; it does not end the stream. The stream is not retried.
        """
        call = self._stub.Pipeline(
            _requests(tasks), timeout=timeout_s or self._timeout_s, metadata=self._metadata
        )
        try:
            async for response in call:
                yield response
        except grpc.RpcError as err:
            raise final_error(err, "") from None
        finally:
            cancel(call)

    async def close(self) -> None:
        """Close the channel (unless it was passed in)."""
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> AsyncTaskMuxClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(
        self,
        method: str,
        stub_method: Callable[..., Awaitable[Resp]],
        request: Any,
        timeout_s: float | None,
    ) -> Resp:
        loop = self._loop(method, getattr(request, "request_id", ""), timeout_s)
        while True:
            try:
                response = await stub_method(
                    request, timeout=loop.attempt_timeout_s(), metadata=self._metadata
                )
            except grpc.RpcError as err:
                await asyncio.sleep(loop.failed(err))
                continue
            loop.succeeded()
            return response

    def _loop(self, method: str, request_id: str, timeout_s: float | None) -> RetryLoop:
        return RetryLoop(
            self._retry,
            method=method,
            request_id=request_id,
            timeout_s=self._timeout_s if timeout_s is None else timeout_s,
            rng=self._rng,
            on_attempt=self._on_attempt,
        )


async def _requests(
    tasks: Iterable[Task] | AsyncIterable[Task],
) -> AsyncIterator[pb.PipelineRequest]:
    async for index, task in async_enumerate(tasks):
        yield pipeline_request(task, index)
