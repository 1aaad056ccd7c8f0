"""The TaskMux gRPC servicer: validate (plans), dispatch, decode. Nothing else lives here.

Errors, metrics, tracing and authentication wrap every method from outside, once, when
the service is added to the server (gateway/handlers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from taskmux_api.kinds import ANALYZABLE, PIPELINE_TASKS, TaskKind, head_kind_proto, task_of_rpc
from taskmux_api.v1 import taskmux_pb2 as pb

from gateway.auth import caller
from gateway.catalog import CatalogWatcher
from gateway.dispatch import Dispatcher, NotQueued
from gateway.errors import (
    InvalidArgument,
    ResourceExhausted,
    TaskmuxError,
    Unavailable,
    Undecodable,
    as_status,
)
from gateway.idempotency import NO_KEY, ClaimOnEnqueue, Idempotency
from gateway.limits import Limiter
from gateway.memory import MemoryGuard
from gateway.plans import PLANNERS, Planner, analyze_jobs, analyze_params
from gateway.settings import GatewaySettings
from gateway.validation import check_heads, check_request_meta, check_texts
from model.manifest import EncoderSpec, HeadSpec
from router.messages import ANALYZE_STREAM_HEAD, pack_messages, unpack_messages
from taskmux.lifecycle import cancel_and_wait

Ctx = grpc.aio.ServicerContext[Any, Any]


class TaskMuxService:
    """Implements taskmux.v1.TaskMux on top of the dispatcher and the catalog.

    Not a subclass of the generated servicer: the unary tasks have no methods here
    (see `method`), and the generated base declares each RPC abstract."""

    def __init__(
        self,
        settings: GatewaySettings,
        dispatcher: Dispatcher,
        watcher: CatalogWatcher,
        idempotency: Idempotency,
        limiter: Limiter,
        memory: MemoryGuard,
    ) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._watcher = watcher
        self._idempotency = idempotency
        self._limiter = limiter
        self._memory = memory

    def method(self, rpc: str) -> Callable[..., Any]:
        """What serves the RPC named `rpc`. A unary task is its planner run through
        `_unary`, so a new task needs a row in the task table and a planner, no method
        here; ListTasks, Analyze and Pipeline are methods of their own."""
        task = task_of_rpc(rpc)
        if task is not None and task.kind in PLANNERS:
            return functools.partial(self._unary, PLANNERS[task.kind])
        method: Callable[..., Any] = getattr(self, rpc)
        return method

    async def ListTasks(self, request: pb.ListTasksRequest, context: Ctx) -> pb.ListTasksResponse:
        self._require_redis()
        catalog = self._watcher.catalog
        if catalog is None:
            raise Unavailable("no worker has registered its heads yet: start a worker, then retry")
        encoder = catalog.encoder
        s = self._settings
        return pb.ListTasksResponse(
            heads=[_head_info(h, encoder) for h in sorted(catalog.heads, key=lambda h: h.name)],
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
                max_candidates=s.max_candidates,
                max_labels=s.max_labels,
                max_heads_per_request=s.max_heads_per_request,
                max_pipeline_in_flight=s.max_pipeline_in_flight,
            ),
        )

    async def Analyze(
        self, request: pb.AnalyzeRequest, context: Ctx
    ) -> AsyncIterator[pb.AnalyzeResult]:
        check_request_meta(request.request_id, request.idempotency_key)
        texts = check_texts(request.texts, self._settings)
        self._require_redis()
        heads = check_heads(request.heads, ANALYZABLE, self._watcher.catalog, self._settings)
        if request.top_k < 0:
            raise InvalidArgument(f"top_k is {request.top_k}; it must be 0 (meaning 1) or more")
        params = analyze_params(request, heads)
        indices: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            indices.setdefault(text, []).append(i)
        jobs = analyze_jobs(list(indices), params)
        self._memory.check()
        timeout_s = self._dispatcher.timeout_s(context.time_remaining())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        claim = await self._idempotency.claim(
            _scope(), TaskKind.ANALYZE, request.idempotency_key, request, timeout_s
        )
        if claim.cached is not None:
            for raw in unpack_messages(claim.cached):
                yield pb.AnalyzeResult.FromString(raw)
            return
        sent: list[bytes] = []
        async with claim:  # renewed while the results come in
            refund = await self._charge(len(texts) * len(heads))
            # One job per distinct text, whose results stream back as soon as it is done
            # (one for all texts when pseudonyms are numbered across them).
            results = self._dispatcher.run_many(
                kind=TaskKind.ANALYZE,
                head=ANALYZE_STREAM_HEAD,
                texts_per_job=jobs,
                top_k=request.top_k,
                timeout_s=max(deadline - loop.time(), 0.001),  # less any wait for a claim
                params=params,
                request_id=request.request_id,
                not_queued=refund,
            )
            async with contextlib.aclosing(results):
                async for job, body in results:
                    for raw in unpack_messages(body):
                        result = pb.AnalyzeResult.FromString(raw)
                        # The worker's text_index counts within its job.
                        for index in indices[jobs[job][result.text_index]]:
                            result.text_index = index
                            if claim is not NO_KEY:
                                sent.append(result.SerializeToString())
                            yield result
            claim.keep(pack_messages(sent))

    async def Pipeline(
        self, request_iterator: AsyncIterator[pb.PipelineRequest | Undecodable], context: Ctx
    ) -> AsyncIterator[pb.PipelineResponse]:
        # Flow control: a task slot is freed only once its response has been written,
        # so a client that stops reading stops the reading of its requests too.
        slots = asyncio.Semaphore(self._settings.max_pipeline_in_flight)
        results: asyncio.Queue[pb.PipelineResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(
            self._pipeline_reader(request_iterator, context, slots, results)
        )
        try:
            while (response := await results.get()) is not None:
                yield response
                slots.release()
            await reader  # surfaces a reader failure
        finally:
            await cancel_and_wait(reader)

    async def _pipeline_reader(
        self,
        requests: AsyncIterator[pb.PipelineRequest | Undecodable],
        context: Ctx,
        slots: asyncio.Semaphore,
        results: asyncio.Queue[pb.PipelineResponse | None],
    ) -> None:
        tasks: set[asyncio.Task[None]] = set()

        async def run_one(request: pb.PipelineRequest | Undecodable) -> None:
            await results.put(await self._pipeline_task(request, context))

        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(run_one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await results.put(None)

    async def _pipeline_task(
        self, request: pb.PipelineRequest | Undecodable, context: Ctx
    ) -> pb.PipelineResponse:
        if isinstance(request, Undecodable):  # its id is unknown: answer with id ""
            return pb.PipelineResponse(error=_task_error(request.error()))
        which = request.WhichOneof("task")
        try:
            if which is None:
                raise InvalidArgument("task is empty: set one of embed, classify, ...")
            planner = PLANNERS[PIPELINE_TASKS[which].kind]
            message = await self._unary(planner, getattr(request, which), context)
            response = pb.PipelineResponse(id=request.id)
            getattr(response, which).CopyFrom(message)
            return response
        except Exception as err:  # one task's failure is its answer, not the stream's end
            return pb.PipelineResponse(id=request.id, error=_task_error(as_status(err, "Pipeline")))

    async def _unary(self, planner: Planner, request: Any, context: Ctx) -> Any:
        check_request_meta(request.request_id, request.idempotency_key)
        plan = planner(request, self._settings, self._watcher.catalog)
        self._require_redis()
        self._memory.check()

        async def compute(timeout_s: float, claim: ClaimOnEnqueue | None) -> bytes:
            refund = await self._charge(len(plan.texts))
            return await self._dispatcher.run(
                kind=plan.kind,
                head=plan.head,
                texts=plan.texts,
                top_k=plan.top_k,
                timeout_s=timeout_s,
                params=plan.params,
                request_id=request.request_id,
                not_queued=refund,
                claim=claim,
            )

        timeout_s = self._dispatcher.timeout_s(context.time_remaining())
        body = await self._idempotency.run(
            _scope(),
            plan.kind,
            request.idempotency_key,
            request,
            timeout_s,
            compute,
            # A tenant is charged after its claim (a replayed result is free), so its
            # claim cannot wait for the enqueue.
            claim_on_enqueue=caller() is None,
        )
        return plan.decode(body)

    async def _charge(self, units: int) -> NotQueued | None:
        """Charge the caller's tenant for a request about to be queued (after its
        idempotency claim, so a replayed result is free); returns what refunds the charge
        if the queue then refuses the jobs, or None without a tenant.

        A text unit is one text through one head: Similarity's query and candidates each
        count, and an Analyze call counts its texts times its heads.
        """
        tenant = caller()
        if tenant is None:
            return None
        await self._limiter.charge(tenant.name, tenant.limits, units)
        return lambda: self._limiter.refund(tenant.name, tenant.limits, units)

    def _require_redis(self) -> None:
        if not self._watcher.redis_ok:
            raise Unavailable("the task queue (Redis) is unreachable; retry shortly")


def _scope() -> str:
    """The caller's tenant ("" without authentication), which scopes its idempotency keys."""
    tenant = caller()
    return "" if tenant is None else tenant.name


def _task_error(err: TaskmuxError) -> pb.TaskError:
    return pb.TaskError(
        code=err.code.value[0],
        status=err.code.name,
        message=err.message,
        retry_after_ms=err.retry_after_ms if isinstance(err, ResourceExhausted) else 0,
    )


def _head_info(head: HeadSpec, encoder: EncoderSpec) -> pb.HeadInfo:
    return pb.HeadInfo(
        name=head.name,
        kind=head_kind_proto(head.kind),
        labels=list(head.labels),
        version=head.version,
        metrics=head.metrics,
        description=head.description,
        features=head.features,
        features_cost=encoder.branch_cost(head.features),
    )
