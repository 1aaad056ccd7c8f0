"""End to end through real processes: gRPC client -> gateway -> Valkey -> worker -> back."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from model.encoder import Encoder, l2_normalize
from model.manifest import load_manifest
from router import keys
from tests.harness import Cluster, require_node_client, serving, wait_for_catalog, wait_until

pytestmark = pytest.mark.integration

MAX_TEXTS = 16
MAX_CHARS = 1000
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def target(cluster: Cluster, model_repo: Path) -> str:
    _, address = cluster.start_gateway(
        max_texts_per_request=str(MAX_TEXTS), max_text_chars=str(MAX_CHARS)
    )
    wait_until(lambda: serving(address), 30, "gateway SERVING")
    wait_for_catalog(address, model_repo)
    return address


@pytest.fixture
def stub(target: str) -> Iterator[taskmux_pb2_grpc.TaskMuxStub]:
    with grpc.insecure_channel(target) as channel:
        yield taskmux_pb2_grpc.TaskMuxStub(channel)


def test_embed_matches_direct_onnx_runtime(
    stub: taskmux_pb2_grpc.TaskMuxStub, model_repo: Path
) -> None:
    texts = ["hello world", "Ünïcödé, 東京 and emoji 🙂", "hello world", "A longer sentence " * 20]
    response = stub.Embed(pb.EmbedRequest(texts=texts), timeout=30)
    got = np.array([e.values for e in response.embeddings], dtype=np.float32)
    assert got.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    manifest = load_manifest(model_repo, verify=False)
    pooled, _ = Encoder(model_repo, manifest.encoder).encode(texts)
    expected = l2_normalize(pooled)
    assert np.min(np.sum(got * expected, axis=1)) >= 0.9999
    assert np.array_equal(got[0], got[2])
    assert response.model == manifest.encoder.name
    assert response.model_version == manifest.encoder.version


def test_classify_sentiment(stub: taskmux_pb2_grpc.TaskMuxStub) -> None:
    texts = ["I loved it, a wonderful and moving film.", "A dull, tedious waste of two hours."]
    response = stub.Classify(pb.ClassifyRequest(head="sentiment", texts=texts), timeout=30)
    assert [r.label for r in response.results] == ["positive", "negative"]
    for result in response.results:
        assert 0.5 < result.score <= 1.0
        assert len(result.top) == 1
        assert (result.top[0].label, result.top[0].score) == (result.label, result.score)
    assert response.head == "sentiment"
    assert response.head_version


@pytest.mark.parametrize(("top_k", "expected"), [(0, 1), (1, 1), (2, 2), (50, 2)])
def test_classify_top_k(stub: taskmux_pb2_grpc.TaskMuxStub, top_k: int, expected: int) -> None:
    request = pb.ClassifyRequest(head="sentiment", texts=["not bad at all"], top_k=top_k)
    (result,) = stub.Classify(request, timeout=30).results
    assert len(result.top) == expected
    scores = [t.score for t in result.top]
    assert scores == sorted(scores, reverse=True)
    if expected == 2:
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_list_tasks(stub: taskmux_pb2_grpc.TaskMuxStub, model_repo: Path) -> None:
    response = stub.ListTasks(pb.ListTasksRequest(), timeout=10)
    heads = {h.name: h for h in response.heads}
    assert heads["embed"].kind == pb.HEAD_KIND_EMBEDDING
    assert heads["sentiment"].kind == pb.HEAD_KIND_CLASSIFICATION
    assert list(heads["sentiment"].labels) == ["negative", "positive"]
    assert heads["sentiment"].metrics["heldout_accuracy"] >= 0.8
    assert response.encoder.dimension == 384
    assert response.encoder.max_sequence_length == 256
    assert response.encoder.version == load_manifest(model_repo, verify=False).encoder.version
    assert response.limits.max_texts_per_request == MAX_TEXTS
    assert response.limits.max_text_chars == MAX_CHARS


def test_limits_are_inclusive(stub: taskmux_pb2_grpc.TaskMuxStub) -> None:
    texts = ["x" * MAX_CHARS] + ["ok"] * (MAX_TEXTS - 1)
    assert len(stub.Embed(pb.EmbedRequest(texts=texts), timeout=30).embeddings) == MAX_TEXTS


BAD_INPUTS = [
    ("Embed", pb.EmbedRequest(texts=[]), INVALID, "texts is empty"),
    ("Embed", pb.EmbedRequest(texts=["fine", ""]), INVALID, "texts[1] is empty"),
    ("Embed", pb.EmbedRequest(texts=[" \t\n"]), INVALID, "texts[0] is empty"),
    ("Embed", pb.EmbedRequest(texts=["x" * (MAX_CHARS + 1)]), INVALID, f"at most {MAX_CHARS}"),
    ("Embed", pb.EmbedRequest(texts=["a"] * (MAX_TEXTS + 1)), INVALID, f"at most {MAX_TEXTS}"),
    ("Classify", pb.ClassifyRequest(head="sentiment", texts=[]), INVALID, "texts is empty"),
    ("Classify", pb.ClassifyRequest(head="", texts=["hi"]), INVALID, "head is empty"),
    ("Classify", pb.ClassifyRequest(head="nope", texts=["hi"]), grpc.StatusCode.NOT_FOUND, "sentiment"),
    ("Classify", pb.ClassifyRequest(head="embed", texts=["hi"]), INVALID, "embedding head"),
    ("Classify", pb.ClassifyRequest(head="sentiment", texts=["hi"], top_k=-1), INVALID, "top_k"),
    ("Classify", pb.ClassifyRequest(head="sentiment", texts=["ok", "x" * (MAX_CHARS + 5)]), INVALID, "texts[1]"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_", "code", "hint"), BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_status(
    stub: taskmux_pb2_grpc.TaskMuxStub,
    cluster: Cluster,
    method: str,
    request_: object,
    code: grpc.StatusCode,
    hint: str,
) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    before = {s: r.xinfo_stream(s)["entries-added"] for s in _task_streams(r)}
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request_, timeout=10)
    assert info.value.code() == code
    assert hint in info.value.details()
    # Validation happens before anything is queued.
    assert {s: r.xinfo_stream(s)["entries-added"] for s in _task_streams(r)} == before


def _task_streams(r: redis.Redis) -> list[bytes]:
    return sorted(r.scan_iter(match=keys.task_stream("*"), _type="stream"))


def test_health_and_reflection(target: str) -> None:
    assert serving(target)
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {"taskmux.v1.TaskMux", "grpc.health.v1.Health"} <= names


def test_worker_survives_malformed_entries(
    stub: taskmux_pb2_grpc.TaskMuxStub, cluster: Cluster
) -> None:
    r = redis.Redis.from_url(cluster.redis_url)
    dead_before = r.xlen(keys.DEAD_LETTER_STREAM)
    stream = keys.task_stream("embed")
    r.xadd(stream, {"garbage": "yes"})
    r.xadd(stream, {"v": "1", "id": "x", "reply_to": "nowhere", "deadline_ms": "soon"})
    r.xadd(stream, {"v": "999", "id": "y"})
    wait_until(lambda: r.xlen(keys.DEAD_LETTER_STREAM) >= dead_before + 3, 20, "dead letters")
    assert len(stub.Embed(pb.EmbedRequest(texts=["still alive"]), timeout=30).embeddings) == 1
    reasons = [f[b"reason"] for _, f in r.xrange(keys.DEAD_LETTER_STREAM)][-3:]
    assert any(b"schema version" in reason for reason in reasons)


def test_reply_streams_do_not_grow(stub: taskmux_pb2_grpc.TaskMuxStub, cluster: Cluster) -> None:
    for _ in range(5):
        stub.Embed(pb.EmbedRequest(texts=["a", "b"]), timeout=30)
    r = redis.Redis.from_url(cluster.redis_url)
    replies = list(r.scan_iter(match=keys.reply_stream("*")))
    assert replies
    wait_until(lambda: all(r.xlen(k) == 0 for k in replies), 5, "reply streams drained")
    assert all(0 < r.ttl(k) <= 60 for k in replies)
    assert r.xlen(keys.task_stream("embed")) == 0


def test_a_grpc_js_client_built_from_protos(target: str) -> None:
    node_client = require_node_client()
    run = subprocess.run(
        ["node", str(node_client / "client.mjs"), target],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert {h["name"] for h in out["tasks"]["heads"]} >= {"embed"}
    assert out["tasks"]["encoder"]["dimension"] == 384
    assert [len(e["values"]) for e in out["embed"]["embeddings"]] == [384, 384]
    assert out["classify"]["results"][0]["label"] == "positive"
    assert len(out["classify"]["results"][0]["top"]) == 2
    assert out["empty"]["code"] == "INVALID_ARGUMENT"
    assert out["unknown"]["code"] == "NOT_FOUND"
