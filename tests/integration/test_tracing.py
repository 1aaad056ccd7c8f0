"""Tracing: one call is one trace, from the gateway's server span through the worker and
back; off by default, and then nothing is recorded and jobs carry no trace context.

The gateway and the worker run in this process (their real `serve` entries, a real Valkey,
the real model repository, a real gRPC channel), so both export into one in-memory exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, SpanKind, format_trace_id, get_current_span
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

import taskmux.tracing
from gateway.auth import hash_key
from gateway.plans import ANALYZE_TEXTS_PER_JOB
from gateway.server import serve as serve_gateway
from gateway.settings import GatewaySettings
from model.manifest import load_manifest
from router.messages import Fields, Job
from taskmux.config import SettingsError
from taskmux.local import free_port
from taskmux.tracing import TraceSettings, Tracing, parent_context
from tests.clusters import ClusterFactory
from tests.harness import Cluster, wait_for_catalog
from workers import consumer
from workers import tracing as worker_tracing
from workers.__main__ import serve as serve_worker
from workers.consumer import Pulled
from workers.settings import WorkerSettings

CANARY = "canary-zebra-7431"  # a request text that must never reach a span
WORKER_STAGES = {"queue wait", "tokenize", "encode", "heads", "publish reply"}
API_KEY = "tracing-tenant-key-0123456789"
AS_TENANT = (("authorization", f"Bearer {API_KEY}"),)


# --- settings and the off switch, no servers --------------------------------------------


def test_tracing_is_off_unless_an_exporter_is_set() -> None:
    settings = TraceSettings.from_env({})
    assert settings.exporter == "none"
    with Tracing(settings) as tracing:
        assert not tracing.enabled
        span = tracing.start_span("anything")
        assert span is INVALID_SPAN
        assert tracing.traceparent(span) == ""


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"TASKMUX_TRACE_EXPORTER": "jaeger"}, "TASKMUX_TRACE_EXPORTER"),
        ({"TASKMUX_TRACE_ENDPOINT": "collector:4317"}, "http:// or https://"),
        ({"TASKMUX_TRACE_SAMPLE_RATIO": "2"}, "between 0 and 1"),
        ({"TASKMUX_TRACE_SAMPLE_RATIO": "half"}, "not a number"),
    ],
)
def test_bad_trace_settings_are_refused(env: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        TraceSettings.from_env(env)


TRACE_NAMES = ("TASKMUX_TRACE_EXPORTER", "TASKMUX_TRACE_ENDPOINT", "TASKMUX_TRACE_SAMPLE_RATIO")


def k8s_settings_names(component: str) -> dict[str, str | None]:
    """`settings_names` of the k8s checks, loaded from its file (k8s/tools is no package)."""
    path = Path(__file__).resolve().parents[2] / "k8s" / "tools" / "common.py"
    spec = importlib.util.spec_from_file_location("k8s_tools_common", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    names: dict[str, str | None] = module.settings_names(component)
    return names


def test_settings_reach_both_processes() -> None:
    env = {"TASKMUX_TRACE_EXPORTER": "OTLP", "TASKMUX_TRACE_SAMPLE_RATIO": "0.25"}
    expected = TraceSettings(exporter="otlp", sample_ratio=0.25)
    assert GatewaySettings.from_env(env).trace == expected
    assert WorkerSettings.from_env(env).trace == expected
    assert "ratio=0.25" in expected.describe()
    # The k8s checks, which read the code without importing it, see both processes read them.
    for component in ("gateway", "worker"):
        assert set(TRACE_NAMES) <= set(k8s_settings_names(component)), component


def test_the_otlp_exporter_starts_and_stops_without_a_collector() -> None:
    settings = TraceSettings(exporter="otlp", endpoint="http://127.0.0.1:9")
    start = time.monotonic()
    with Tracing(settings) as tracing:
        assert tracing.enabled
    assert time.monotonic() - start < 10  # nothing queued, so nothing to wait for


def test_traceparent_round_trip() -> None:
    exporter = InMemorySpanExporter()
    with Tracing(exporter=exporter) as tracing:
        span = tracing.start_span("enqueue")
        traceparent = tracing.traceparent(span)
        child = tracing.start_span("job", parent=parent_context(traceparent))
        child.end()
        span.end()
    version, _, _, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    job, enqueue = exporter.get_finished_spans()
    assert job.parent is not None and job.parent.span_id == enqueue.context.span_id
    assert job.context.trace_id == enqueue.context.trace_id
    for bad in ("", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
        assert not get_current_span(parent_context(bad)).get_span_context().is_valid


def test_a_dead_lettered_job_ends_its_open_span() -> None:
    """A job this worker opened a span for and then gave up on must not stay open."""
    exporter = InMemorySpanExporter()
    job = Job(id="j1", reply_to="r", deadline_ms=0, kind="embed", head="embed", texts=("x",))
    with Tracing(exporter=exporter) as tracing:
        spans = worker_tracing.JobSpans(tracing, "w1")
        spans.pulled([Pulled("taskmux:v1:tasks:embed", b"1-0", job)])
        spans.dead_lettered(job, "delivered 6 times")
        spans.dead_lettered(job, "again")  # nothing left open: a no-op
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "job embed"]
    assert span.status.status_code.name == "ERROR"


def test_off_costs_next_to_nothing() -> None:
    """Not a pass/fail timing: prints what the request path pays per call when off."""
    tracing = Tracing()
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        span = tracing.start_span("enqueue")
        tracing.traceparent(span)
        span.end()
    per_call_ns = (time.perf_counter() - start) / n * 1e9
    print(f"tracing off: {per_call_ns:.0f} ns per start_span + traceparent + end")


# --- one call through a real gateway and worker -----------------------------------------


@pytest.fixture(scope="module")
def cluster(make_shared_cluster: ClusterFactory) -> Cluster:
    """Valkey alone: each test runs its gateway and worker in process."""
    return make_shared_cluster(workers=0)


@pytest.fixture
def job_fields(monkeypatch: pytest.MonkeyPatch) -> list[Fields]:
    """The raw fields of every job entry the in-process worker reads."""
    seen: list[Fields] = []
    decode = consumer._decode

    def recording(stream: str, entry_id: bytes, fields: Fields, cipher: Any) -> Any:
        seen.append(dict(fields))
        return decode(stream, entry_id, fields, cipher)

    monkeypatch.setattr(consumer, "_decode", recording)
    return seen


class _Shared(SpanExporter):
    """One process's view of an exporter that two share: its provider's shutdown would
    stop the exporter for the other process too."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export(spans)

    def shutdown(self) -> None:
        pass


@contextlib.asynccontextmanager
async def in_process(
    cluster: Cluster, exporter: InMemorySpanExporter | None, keys_file: Path | None = None
) -> AsyncIterator[taskmux_pb2_grpc.TaskMuxStub]:
    """A gateway and a worker in this event loop; a stub once every head is listed.
    With `keys_file`, callers send AS_TENANT."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        "TASKMUX_API_KEYS_FILE": str(keys_file or ""),
        "TASKMUX_REDIS_URL": cluster.redis_url,
        "TASKMUX_LISTEN_ADDR": address,
        "TASKMUX_HEALTH_ADDR": "127.0.0.1:0",
        "TASKMUX_METRICS_ADDR": "127.0.0.1:0",
        "TASKMUX_MODEL_REPO": str(cluster.model_repo),
        "TASKMUX_RELOAD_INTERVAL_MS": "0",
        "TASKMUX_INTRA_OP_THREADS": "1",
        "TASKMUX_DRAIN_TIMEOUT_S": "5",
    }
    stop = asyncio.Event()
    shared = _Shared(exporter) if exporter is not None else None
    async with asyncio.TaskGroup() as servers:
        servers.create_task(
            serve_gateway(GatewaySettings.from_env(env), stop, span_exporter=shared)
        )
        servers.create_task(serve_worker(WorkerSettings.from_env(env), stop, span_exporter=shared))
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = taskmux_pb2_grpc.TaskMuxStub(channel)
                await _wait_for_catalog(stub, cluster.model_repo, bool(keys_file))
                yield stub
        finally:
            stop.set()


async def _wait_for_catalog(
    stub: taskmux_pb2_grpc.TaskMuxStub, model_repo: Path, keyed: bool
) -> None:
    expected = {h.name for h in load_manifest(model_repo, verify=False).heads}
    metadata = AS_TENANT if keyed else None
    for _ in range(600):
        with contextlib.suppress(grpc.RpcError):
            response = await stub.ListTasks(pb.ListTasksRequest(), timeout=2, metadata=metadata)
            if {h.name for h in response.heads} == expected:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the catalog never listed {sorted(expected)}")


def _trace_of(
    spans: Sequence[ReadableSpan], root_name: str
) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one server span named `root_name`, and every span of its trace."""
    (root,) = [s for s in spans if s.name == root_name]
    trace_id = root.context.trace_id
    return root, [s for s in spans if s.context.trace_id == trace_id]


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    while span.parent is not None:
        span = by_id[span.parent.span_id]  # KeyError: a parent that was never exported
        names.append(span.name)
    return names


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def _values(span: ReadableSpan) -> Iterator[str]:
    for attributes in [span.attributes or {}, *[e.attributes or {} for e in span.events]]:
        for value in attributes.values():
            yield from ([str(v) for v in value] if isinstance(value, tuple) else [str(value)])


async def test_one_call_is_one_connected_trace(
    cluster: Cluster, job_fields: list[Fields], tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    texts = [f"I loved this film, {CANARY}", "Angela Merkel visited Paris."]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"tenants": {"acme": {"key_sha256": hash_key(API_KEY)}}}))
    async with in_process(cluster, exporter, keys_file) as stub:
        embedded = await stub.Embed(
            pb.EmbedRequest(texts=texts, request_id="trace-embed"), timeout=30, metadata=AS_TENANT
        )
        # One text more than a job holds: two jobs, each continuing the trace.
        many = [*texts, *(f"another text {i}" for i in range(ANALYZE_TEXTS_PER_JOB - 1))]
        analyze = pb.AnalyzeRequest(texts=many, heads=["embed", "sentiment", "entities"])
        results = [r async for r in stub.Analyze(analyze, timeout=30, metadata=AS_TENANT)]
    assert len(embedded.embeddings) == 2 and len(results) == 3 * len(many)
    spans = exporter.get_finished_spans()  # complete: stopping flushed both processes
    by_id = {s.context.span_id: s for s in spans}

    # Embed: gateway -> worker -> gateway, one trace id, every parent exported.
    root, embed = _trace_of(spans, "taskmux.v1.TaskMux/Embed")
    assert root.kind is SpanKind.SERVER and root.parent is None
    assert root.attributes is not None
    assert root.attributes["rpc.method"] == "Embed"
    assert root.attributes["taskmux.request_id"] == "trace-embed"
    assert root.attributes["taskmux.tenant"] == "acme"
    assert root.attributes["rpc.grpc.status_code"] == 0
    names = {s.name: s for s in embed}
    assert {"enqueue embed", "await reply", "job embed"} | WORKER_STAGES <= set(names)
    assert names["enqueue embed"].kind is SpanKind.PRODUCER
    assert names["job embed"].kind is SpanKind.CONSUMER
    assert _service(names["enqueue embed"]) == _service(names["await reply"]) == "taskmux-gateway"
    for stage in WORKER_STAGES:
        assert _service(names[stage]) == "taskmux-worker"
        assert _ancestors(names[stage], by_id) == [
            "job embed",
            "enqueue embed",
            "taskmux.v1.TaskMux/Embed",
        ]
    assert _ancestors(names["await reply"], by_id) == ["taskmux.v1.TaskMux/Embed"]

    # Analyze: a job per ANALYZE_TEXTS_PER_JOB distinct texts, both continuing the one trace.
    root, analyze_spans = _trace_of(spans, "taskmux.v1.TaskMux/Analyze")
    assert root.attributes is not None
    assert list(root.attributes["taskmux.heads"]) == ["embed", "sentiment", "entities"]
    jobs = [s for s in analyze_spans if s.name == "job _analyze"]
    assert len(jobs) == 2
    for job in jobs:
        assert _ancestors(job, by_id) == ["enqueue _analyze", "taskmux.v1.TaskMux/Analyze"]
        stages = {
            s.name for s in analyze_spans if s.parent and s.parent.span_id == job.context.span_id
        }
        assert stages == WORKER_STAGES
    (waiting,) = [s for s in analyze_spans if s.name == "await reply"]
    assert len(waiting.events) == 2  # one per job's reply

    # Every worker span belongs to one of the two calls: none started a trace of its own.
    traces = {root.context.trace_id, embed[0].context.trace_id}
    assert {s.context.trace_id for s in spans if _service(s) == "taskmux-worker"} <= traces
    # Jobs carried the context; spans never carried the texts.
    assert all(f.get(b"traceparent", b"").startswith(b"00-") for f in job_fields)
    assert len(job_fields) == 3
    secrets = (CANARY, "Merkel", API_KEY)
    leaked = [s.name for s in spans if any(x in v for v in _values(s) for x in secrets)]
    assert not leaked, f"request text or key in span attributes of {leaked}"
    assert format_trace_id(root.context.trace_id) in job_fields[-1][b"traceparent"].decode()


async def test_off_records_nothing_and_jobs_carry_no_traceparent(
    cluster: Cluster, job_fields: list[Fields], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_provider(*args: object, **kwargs: object) -> None:
        raise AssertionError("a TracerProvider was built with tracing off")

    monkeypatch.setattr(taskmux.tracing, "TracerProvider", no_provider)
    async with in_process(cluster, None) as stub:
        response = await stub.Embed(pb.EmbedRequest(texts=["hello"]), timeout=30)
    assert len(response.embeddings) == 1
    assert job_fields and all(b"traceparent" not in f for f in job_fields)


def test_processes_configured_by_environment_export_one_trace(cluster: Cluster) -> None:
    """`taskmux` processes as deployed: settings from TASKMUX_TRACE_*, spans flushed on SIGTERM."""
    worker = cluster.start_worker(trace_exporter="console")
    gateway, address = cluster.start_gateway(trace_exporter="console")
    try:
        wait_for_catalog(address, cluster.model_repo)
        with grpc.insecure_channel(address) as channel:
            stub = taskmux_pb2_grpc.TaskMuxStub(channel)
            stub.Embed(pb.EmbedRequest(texts=[CANARY], request_id="env-trace"), timeout=30)
    finally:
        assert gateway.stop() == 0 and worker.stop() == 0
    gateway_log, worker_log = gateway.output(), worker.output()
    match = re.search(
        r'"name": "taskmux.v1.TaskMux/Embed",\s*"context": \{\s*"trace_id": "(0x[0-9a-f]+)"',
        gateway_log,
    )
    assert match, gateway_log[-3000:]
    job = re.search(
        r'"name": "job embed",\s*"context": \{\s*"trace_id": "(0x[0-9a-f]+)"', worker_log
    )
    assert job and job.group(1) == match.group(1), worker_log[-3000:]
    assert CANARY not in gateway_log + worker_log
