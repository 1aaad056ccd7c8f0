"""Prometheus endpoints and JSON logs of a real gateway and worker."""

from __future__ import annotations

import contextlib
import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
from taskmux_api.kinds import HeadKind
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.auth import hash_key
from model.manifest import load_manifest
from taskmux.local import free_port
from tests.clusters import ClusterFactory
from tests.harness import Cluster, serving, wait_until

pytestmark = pytest.mark.integration

EMBEDS = 3
CLASSIFIES = 2


@pytest.fixture(scope="module")
def cluster(make_shared_cluster: ClusterFactory) -> Cluster:
    return make_shared_cluster(
        workers=[{"metrics_addr": f"127.0.0.1:{free_port()}"}],
        gateways=[{"metrics_addr": f"127.0.0.1:{free_port()}"}],
    )


def _metrics_port(proc_env_log: str) -> int:
    match = re.search(r"metrics on port (\d+)", proc_env_log)
    assert match, proc_env_log[-2000:]
    return int(match.group(1))


def scrape(port: int) -> dict[str, float]:
    """Every sample of http://127.0.0.1:port/metrics, keyed by name{labels}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def settled(port: int, before: dict[str, float], counted: str, calls: int) -> dict[str, float]:
    """A scrape taken once `counted` has moved by `calls` (or after 10 s): a call is
    counted as it leaves the handler stack, which can be just after its caller has its
    status. The test then checks every figure exactly."""
    samples: dict[str, float] = {}

    def moved() -> bool:
        samples.update(scrape(port))
        return delta(samples, before, counted) >= calls

    # On a timeout the exact checks that follow say what is missing.
    with contextlib.suppress(AssertionError):
        wait_until(moved, 10, f"{counted} to move by {calls}")
    return samples


def _requests(code: str, head: str, rpc: str) -> str:
    """The sample name of `taskmux_gateway_requests_total` for these labels."""
    return f'taskmux_gateway_requests_total{{code="{code}",head="{head}",rpc="{rpc}"}}'


def _classification_head(model_repo: Path) -> str:
    heads = load_manifest(model_repo, verify=False).heads
    return next(h.name for h in heads if h.kind == HeadKind.CLASSIFICATION)


def test_counters_move_by_exactly_the_calls_made(cluster: Cluster, model_repo: Path) -> None:
    worker, gateway = cluster.procs[1], cluster.procs[2]
    wait_until(lambda: "metrics on port" in worker.output(), 60, "worker metrics")
    worker_port, gateway_port = _metrics_port(worker.output()), _metrics_port(gateway.output())
    head = _classification_head(model_repo)
    stub = taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(gateway.address))

    def ready() -> bool:
        try:
            return bool(stub.ListTasks(pb.ListTasksRequest(), timeout=2).heads)
        except grpc.RpcError:
            return False

    wait_until(ready, 60, "the worker's catalog")
    before_g, before_w = scrape(gateway_port), scrape(worker_port)
    for i in range(EMBEDS):
        stub.Embed(pb.EmbedRequest(texts=[f"text {i}"], request_id=f"req-{i}"), timeout=30)
    for _ in range(CLASSIFIES):
        stub.Classify(pb.ClassifyRequest(head=head, texts=["a", "b"]), timeout=30)
    with pytest.raises(grpc.RpcError) as bad:
        stub.Embed(pb.EmbedRequest(texts=[], request_id="req-bad"), timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    g = settled(
        gateway_port, before_g, 'taskmux_gateway_request_seconds_count{rpc="Embed"}', EMBEDS + 1
    )
    ok_embed = 'taskmux_gateway_requests_total{code="OK",head="",rpc="Embed"}'
    bad_embed = 'taskmux_gateway_requests_total{code="INVALID_ARGUMENT",head="",rpc="Embed"}'
    ok_classify = f'taskmux_gateway_requests_total{{code="OK",head="{head}",rpc="Classify"}}'
    assert delta(g, before_g, ok_embed) == EMBEDS
    assert delta(g, before_g, bad_embed) == 1
    assert delta(g, before_g, ok_classify) == CLASSIFIES
    assert delta(g, before_g, 'taskmux_gateway_request_seconds_count{rpc="Embed"}') == EMBEDS + 1

    expected_results = EMBEDS + 2 * CLASSIFIES

    def worker_caught_up() -> bool:
        return delta(scrape(worker_port), before_w, "taskmux_worker_head_results_total") >= (
            expected_results
        )

    wait_until(worker_caught_up, 10, "worker counters")
    w = scrape(worker_port)
    assert delta(w, before_w, "taskmux_worker_head_results_total") == expected_results
    assert delta(w, before_w, 'taskmux_worker_stage_seconds_count{stage="queue"}') == (
        EMBEDS + CLASSIFIES
    )
    assert w["taskmux_worker_busy"] == 0
    assert any(k.startswith("taskmux_queue_backlog{") for k in scrape(worker_port))

    lines = [json.loads(line) for line in gateway.output().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    (access,) = [x for x in lines if x.get("request_id") == "req-bad"]  # failures are logged
    assert access["message"].startswith("Embed INVALID_ARGUMENT")


def test_redis_reconnects_are_counted(cluster: Cluster) -> None:
    """Redis goes away and comes back: the gateway and the worker each count a reconnect."""
    redis_proc, worker, gateway = cluster.procs[0], cluster.procs[1], cluster.procs[2]
    worker_port, gateway_port = _metrics_port(worker.output()), _metrics_port(gateway.output())
    before = scrape(gateway_port)["taskmux_gateway_redis_reconnects_total"]
    before_w = scrape(worker_port).get("taskmux_worker_redis_reconnects_total", 0.0)
    redis_proc.stop()
    wait_until(lambda: not serving(gateway.address), 30, "gateway NOT_SERVING without Redis")
    cluster.start_redis()
    wait_until(lambda: serving(gateway.address), 30, "gateway SERVING again")
    assert scrape(gateway_port)["taskmux_gateway_redis_reconnects_total"] == before + 1

    def worker_reconnected() -> bool:
        return scrape(worker_port).get("taskmux_worker_redis_reconnects_total", 0.0) > before_w

    wait_until(worker_reconnected, 30, "the worker's reconnect")


def test_refused_calls_are_counted_and_logged(
    cluster: Cluster, model_repo: Path, tmp_path: Path
) -> None:
    """Metrics and the access log sit outside authentication: a missing key, a wrong key
    and a forbidden head (unary and Pipeline) are counted with their status codes."""
    key = "metrics-embed-only-key-0123456789"
    keys_file = tmp_path / "keys.json"
    tenants = {"acme": {"key_sha256": hash_key(key), "heads": ["embed"]}}
    keys_file.write_text(json.dumps({"tenants": tenants}))
    gateway, address = cluster.start_gateway(api_keys_file=str(keys_file))
    wait_until(lambda: "metrics on port" in gateway.output(), 30, "keyed gateway metrics")
    port = _metrics_port(gateway.output())
    head = _classification_head(model_repo)
    bearer = (("authorization", f"Bearer {key}"),)
    stub = taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(address))

    def ready() -> bool:  # the catalog, so that `head` is a known head label
        try:
            return bool(stub.ListTasks(pb.ListTasksRequest(), timeout=2, metadata=bearer).heads)
        except grpc.RpcError:
            return False

    wait_until(ready, 60, "the catalog through the keyed gateway")
    before = scrape(port)
    refused = {
        "no-key": lambda: stub.Embed(pb.EmbedRequest(texts=["x"], request_id="no-key")),
        "wrong-key": lambda: stub.Embed(
            pb.EmbedRequest(texts=["x"], request_id="wrong-key"),
            metadata=(("authorization", "Bearer wrong"),),
        ),
        "forbidden": lambda: stub.Classify(
            pb.ClassifyRequest(head=head, texts=["x"], request_id="forbidden"), metadata=bearer
        ),
        "pipeline": lambda: list(
            stub.Pipeline(
                iter([pb.PipelineRequest(id="1", classify=pb.ClassifyRequest(head=head))]),
                metadata=bearer,
            )
        ),
    }
    codes = {}
    for name, call in refused.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        codes[name] = info.value.code()
    assert codes == {
        "no-key": grpc.StatusCode.UNAUTHENTICATED,
        "wrong-key": grpc.StatusCode.UNAUTHENTICATED,
        "forbidden": grpc.StatusCode.PERMISSION_DENIED,
        "pipeline": grpc.StatusCode.PERMISSION_DENIED,
    }

    unauthenticated = _requests("UNAUTHENTICATED", "", "Embed")
    denied = _requests("PERMISSION_DENIED", head, "Classify")
    denied_pipeline = _requests("PERMISSION_DENIED", "", "Pipeline")
    after = settled(port, before, denied_pipeline, 1)  # the last call made
    assert delta(after, before, unauthenticated) == 2
    assert delta(after, before, denied) == 1
    assert delta(after, before, denied_pipeline) == 1
    assert delta(after, before, 'taskmux_gateway_request_seconds_count{rpc="Embed"}') == 2

    lines = [json.loads(x) for x in gateway.output().splitlines() if x.startswith("{")]
    access = {
        x["request_id"]: x for x in lines if x["logger"] == "gateway.metrics" and "request_id" in x
    }
    assert access["no-key"]["message"].startswith("Embed UNAUTHENTICATED")
    assert "tenant" not in access["no-key"]
    assert access["forbidden"]["message"].startswith("Classify PERMISSION_DENIED")
    assert access["forbidden"]["tenant"] == "acme"
    assert key not in gateway.output()
