"""The Python client: unit tests of its retry policy against a scripted in-process server,
then every method, sync and asyncio, against a real cluster."""

from __future__ import annotations

import random
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
import redis
from google.protobuf import any_pb2, duration_pb2
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client import (
    AsyncTaskMuxClient,
    Attempt,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RetryPolicy,
    Task,
    TaskMuxClient,
    TaskMuxError,
    UnavailableError,
    retry_hint_s,
)

from model.manifest import load_manifest
from router import keys
from taskmux.local import free_port
from tests.harness import Cluster, serving, wait_until

Code = grpc.StatusCode
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01)


# --- unit tests: a scripted server ------------------------------------------------------


@dataclass
class Outcome:
    """What the scripted server answers to one call."""

    code: Code = Code.OK
    retry_info_ms: int | None = None  # a RetryInfo detail in the rich status
    retry_after_ms: str | None = None  # the plain trailing metadata entry
    results_first: int = 0  # Analyze: the results streamed before the outcome


@dataclass
class Scripted(taskmux_pb2_grpc.TaskMuxServicer):
    """Answers Embed and Analyze with the scripted outcomes in turn (OK once they run out)."""

    outcomes: list[Outcome] = field(default_factory=list)
    seen: list[pb.EmbedRequest | pb.AnalyzeRequest] = field(default_factory=list)

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        self.seen.append(request)
        outcome = self.outcomes.pop(0) if self.outcomes else Outcome()
        if outcome.code == Code.OK:
            return pb.EmbedResponse(model="scripted")
        self._abort(outcome, context)

    def Analyze(
        self, request: pb.AnalyzeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AnalyzeResult]:
        """Streams `results_first` results, then ends or fails as scripted (2 results if OK)."""
        self.seen.append(request)
        outcome = self.outcomes.pop(0) if self.outcomes else Outcome(results_first=2)
        for index in range(outcome.results_first):
            yield pb.AnalyzeResult(text_index=index, head="embed")
        if outcome.code != Code.OK:
            self._abort(outcome, context)

    def _abort(self, outcome: Outcome, context: grpc.ServicerContext) -> NoReturn:
        if outcome.retry_after_ms is not None:
            context.set_trailing_metadata((("retry-after-ms", outcome.retry_after_ms),))
        if outcome.retry_info_ms is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(outcome.retry_info_ms)
            detail = any_pb2.Any()
            detail.Pack(RetryInfo(retry_delay=delay))
            status = Status(code=outcome.code.value[0], message="scripted", details=[detail])
            context.abort_with_status(rpc_status.to_status(status))
        context.abort(outcome.code, "scripted")
        raise AssertionError("unreachable")


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    taskmux_pb2_grpc.add_TaskMuxServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_unavailable_is_retried_with_the_same_ids(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(Code.UNAVAILABLE), Outcome(Code.UNAVAILABLE)]
    attempts: list[Attempt] = []
    with TaskMuxClient(target, retry=FAST, on_attempt=attempts.append) as client:
        assert client.embed(["x"]).model == "scripted"
    assert [a.code for a in attempts] == [Code.UNAVAILABLE, Code.UNAVAILABLE, Code.OK]
    assert [a.number for a in attempts] == [1, 2, 3]
    assert len(servicer.seen) == 3
    assert len({(r.request_id, r.idempotency_key) for r in servicer.seen}) == 1
    assert servicer.seen[0].request_id and servicer.seen[0].idempotency_key


@pytest.mark.parametrize(
    "code",
    [Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNKNOWN],
)
def test_other_codes_are_never_retried(scripted: tuple[Scripted, str], code: Code) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(code)]
    attempts: list[Attempt] = []
    with (
        TaskMuxClient(target, retry=FAST, on_attempt=attempts.append) as client,
        pytest.raises(TaskMuxError) as info,
    ):
        client.embed(["x"])
    assert info.value.code() == code
    assert info.value.attempts == 1
    assert len(servicer.seen) == 1
    assert [(a.code, a.retry_in_s) for a in attempts] == [(code, None)]


def test_invalid_argument_raises_its_own_class(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(Code.INVALID_ARGUMENT)]
    with TaskMuxClient(target, retry=FAST) as client, pytest.raises(InvalidArgumentError) as info:
        client.embed(["x"], request_id="mine")
    assert info.value.request_id == "mine"
    assert info.value.details() == "scripted"


@pytest.mark.parametrize(
    ("outcome", "hint_s"),
    [
        (Outcome(Code.RESOURCE_EXHAUSTED, retry_info_ms=40), 0.04),
        (Outcome(Code.RESOURCE_EXHAUSTED, retry_after_ms="30"), 0.03),
        (Outcome(Code.UNAVAILABLE, retry_info_ms=20, retry_after_ms="999"), 0.02),
    ],
)
def test_the_server_hint_sets_the_least_wait(
    scripted: tuple[Scripted, str], outcome: Outcome, hint_s: float
) -> None:
    servicer, target = scripted
    servicer.outcomes = [outcome]
    attempts: list[Attempt] = []
    with TaskMuxClient(target, retry=FAST, on_attempt=attempts.append) as client:
        client.embed(["x"])
    assert len(servicer.seen) == 2
    first = attempts[0].retry_in_s
    assert first is not None and hint_s <= first <= hint_s * 1.2 + 1e-9


def test_resource_exhausted_without_a_hint_is_final(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(Code.RESOURCE_EXHAUSTED)]  # e.g. a message over the limit
    with TaskMuxClient(target, retry=FAST) as client, pytest.raises(ResourceExhaustedError):
        client.embed(["x"])
    assert len(servicer.seen) == 1


def test_attempts_and_deadline_bound_the_retries(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(Code.UNAVAILABLE)] * 10
    with TaskMuxClient(target, retry=FAST) as client, pytest.raises(UnavailableError) as info:
        client.embed(["x"])
    assert info.value.attempts == FAST.max_attempts == len(servicer.seen)
    # A hint that reaches past the deadline: no second attempt.
    servicer.seen.clear()
    servicer.outcomes = [Outcome(Code.RESOURCE_EXHAUSTED, retry_after_ms="60000")]
    with (
        TaskMuxClient(target, retry=FAST, timeout_s=2) as client,
        pytest.raises(ResourceExhaustedError) as exhausted,
    ):
        client.embed(["x"])
    assert exhausted.value.retry_after_s == 60.0
    assert len(servicer.seen) == 1


def test_caller_ids_are_sent_as_given(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    with TaskMuxClient(target, auto_idempotency_key=False) as client:
        client.embed(["x"], request_id="r-1", idempotency_key="k-1")
        client.embed(["x"])
    assert (servicer.seen[0].request_id, servicer.seen[0].idempotency_key) == ("r-1", "k-1")
    assert servicer.seen[1].request_id and not servicer.seen[1].idempotency_key
    with TaskMuxClient(target) as client, pytest.raises(TypeError, match="not one string"):
        client.embed("a lone string")


def test_analyze_is_retried_until_its_first_result(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(Code.UNAVAILABLE), Outcome(Code.OK, results_first=3)]
    attempts: list[Attempt] = []
    with TaskMuxClient(target, retry=FAST, on_attempt=attempts.append) as client:
        results = list(client.analyze(["a", "b", "c"], ["embed"]))
    assert [r.text_index for r in results] == [0, 1, 2]
    assert [a.code for a in attempts] == [Code.UNAVAILABLE, Code.OK]
    assert len({r.request_id for r in servicer.seen}) == 1 and len(servicer.seen) == 2


def test_analyze_is_not_retried_after_a_result(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(Code.UNAVAILABLE, results_first=1)]
    received: list[pb.AnalyzeResult] = []
    with TaskMuxClient(target, retry=FAST) as client, pytest.raises(UnavailableError) as info:
        received.extend(client.analyze(["a", "b"], ["embed"], request_id="r-7"))
    assert len(received) == 1  # a retry would have sent it again
    assert len(servicer.seen) == 1
    assert info.value.request_id == "r-7"


async def test_the_async_analyze_retries_the_same_way(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(Code.UNAVAILABLE), Outcome(Code.UNAVAILABLE, results_first=1)]
    received: list[pb.AnalyzeResult] = []
    async with AsyncTaskMuxClient(target, retry=FAST) as client:
        with pytest.raises(UnavailableError):
            async for result in client.analyze(["a", "b"], ["embed"]):
                received.append(result)
        assert len(servicer.seen) == 2 and len(received) == 1
        empty = Outcome(Code.OK, results_first=0)  # an empty stream succeeds at once
        servicer.outcomes = [empty]
        assert [r async for r in client.analyze(["a"], ["embed"])] == []
    assert len(servicer.seen) == 3


async def test_the_async_client_retries_the_same_way(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.outcomes = [Outcome(Code.UNAVAILABLE), Outcome(Code.INVALID_ARGUMENT)]
    attempts: list[Attempt] = []
    async with AsyncTaskMuxClient(target, retry=FAST, on_attempt=attempts.append) as client:
        with pytest.raises(InvalidArgumentError):
            await client.embed(["x"])
        assert (await client.embed(["y"])).model == "scripted"
    assert [a.code for a in attempts] == [Code.UNAVAILABLE, Code.INVALID_ARGUMENT, Code.OK]
    assert servicer.seen[0].request_id == servicer.seen[1].request_id
    assert servicer.seen[0].idempotency_key == servicer.seen[1].idempotency_key


def test_backoff_grows_with_full_jitter_and_a_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2, max_backoff_s=0.5)
    rng = random.Random(7)
    for failed, bound in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        delays = [policy.backoff_s(failed, None, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= bound
        assert max(delays) > bound * 0.8  # the whole range is used
    assert all(policy.backoff_s(1, 2.0, rng) >= 2.0 for _ in range(50))


def test_retry_hint_parsing_ignores_junk() -> None:
    class Err(grpc.RpcError):
        def __init__(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
            self.metadata = metadata

        def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
            return self.metadata

    assert retry_hint_s(Err(())) is None
    assert retry_hint_s(Err((("retry-after-ms", "soon"),))) is None
    assert retry_hint_s(Err((("grpc-status-details-bin", b"\xff\xff"),))) is None
    assert retry_hint_s(Err((("retry-after-ms", "1500"),))) == 1.5


# --- against a real cluster -------------------------------------------------------------


@pytest.fixture(scope="module")
def target(cluster: Cluster, model_repo: Path) -> str:
    _, address = cluster.start_gateway()
    wait_until(lambda: serving(address), 30, "gateway SERVING")
    expected = {h.name for h in load_manifest(model_repo, verify=False).heads}
    client = TaskMuxClient(address, timeout_s=2)

    def ready() -> bool:
        try:
            return {h.name for h in client.list_tasks().heads} == expected
        except TaskMuxError:
            return False

    wait_until(ready, 60, "the worker's catalog")
    client.close()
    return address


def _added(cluster: Cluster, head: str) -> int:
    r = redis.Redis.from_url(cluster.redis_url)
    stream = keys.task_stream(head)
    return int(r.xinfo_stream(stream)["entries-added"]) if r.exists(stream) else 0


@pytest.mark.integration
def test_every_method_sync(target: str) -> None:
    with TaskMuxClient(target, timeout_s=30) as client:
        assert "sentiment" in {h.name for h in client.list_tasks().heads}
        assert len(client.embed(["hello", "world"]).embeddings[1].values) == 384
        assert client.classify("sentiment", ["I loved it"], top_k=2).results[0].label == "positive"
        entities = client.extract_entities(["Angela Merkel visited Paris."]).results[0].entities
        assert {e.label for e in entities} >= {"PER", "LOC"}
        similar = client.similarity("reset my password", ["pasta", "change password"], top_k=1)
        assert similar.top[0].index == 1
        zero = client.zero_shot_classify(["The striker scored twice."], ["sports", "cooking"])
        assert zero.results[0].label == "sports"
        results = list(client.analyze(["a film I loved", "Paris"], ["embed", "sentiment"]))
        assert sorted((r.text_index, r.head) for r in results) == [
            (0, "embed"), (0, "sentiment"), (1, "embed"), (1, "sentiment"),
        ]  # fmt: skip
        tasks: list[Task] = [
            pb.EmbedRequest(texts=["one"]),
            pb.ClassifyRequest(head="nope", texts=["two"]),
            pb.PipelineRequest(id="mine", similarity=pb.SimilarityRequest(query="q", candidates=["c"])),
        ]  # fmt: skip
        answers = {r.id: r for r in client.pipeline(tasks)}
        assert set(answers) == {"0", "1", "mine"}
        assert answers["0"].WhichOneof("result") == "embed"
        assert answers["1"].error.status == "NOT_FOUND"
        assert len(answers["mine"].similarity.scores) == 1


@pytest.mark.integration
async def test_every_method_async(target: str) -> None:
    async with AsyncTaskMuxClient(target, timeout_s=30) as client:
        assert (await client.list_tasks()).encoder.dimension == 384
        assert len((await client.embed(["hello"])).embeddings) == 1
        assert (await client.classify("sentiment", ["awful"])).results[0].label == "negative"
        assert len((await client.extract_entities(["Paris"])).results) == 1
        assert len((await client.similarity("q", ["a", "b"])).scores) == 2
        zero = await client.zero_shot_classify(["Whisk the eggs."], ["sports", "cooking"])
        assert zero.results[0].label == "cooking"
        results = [r async for r in client.analyze(["x", "y", "x"], ["embed"])]
        assert sorted(r.text_index for r in results) == [0, 1, 2]

        async def tasks() -> AsyncIterator[pb.EmbedRequest]:
            for i in range(5):
                yield pb.EmbedRequest(texts=[f"text {i}"])

        answers = [r async for r in client.pipeline(tasks())]
        assert sorted(r.id for r in answers) == ["0", "1", "2", "3", "4"]


@pytest.mark.integration
def test_real_errors_are_typed_and_not_retried(target: str) -> None:
    attempts: list[Attempt] = []
    with TaskMuxClient(target, retry=FAST, on_attempt=attempts.append) as client:
        with pytest.raises(InvalidArgumentError, match="texts is empty"):
            client.embed([])
        with pytest.raises(NotFoundError):
            client.classify("nope", ["x"])
        with pytest.raises(InvalidArgumentError):
            list(client.analyze(["x"], []))
    assert [a.number for a in attempts] == [1, 1, 1]


@pytest.mark.integration
def test_a_call_made_before_the_gateway_starts_succeeds_once_computed(
    cluster: Cluster, target: str
) -> None:
    port = free_port()
    first_failure = threading.Event()
    attempts: list[Attempt] = []

    def hook(attempt: Attempt) -> None:
        attempts.append(attempt)
        if attempt.code == Code.UNAVAILABLE:
            first_failure.set()

    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.05, max_backoff_s=0.5)
    before = _added(cluster, "embed")
    with (
        TaskMuxClient(f"127.0.0.1:{port}", timeout_s=60, retry=policy, on_attempt=hook) as client,
        futures.ThreadPoolExecutor(1) as pool,
    ):
        call = pool.submit(client.embed, ["sent before the gateway is up"])
        assert first_failure.wait(30)
        cluster.start_gateway(listen_addr=f"127.0.0.1:{port}")
        response = call.result()
    assert len(response.embeddings) == 1
    assert attempts[0].code == Code.UNAVAILABLE and attempts[-1].code == Code.OK
    assert len({a.request_id for a in attempts}) == 1
    assert _added(cluster, "embed") == before + 1  # computed once, however many attempts
