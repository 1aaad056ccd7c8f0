"""Hot reload: heads added, updated or broken while the system serves live traffic."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from taskmux_api.kinds import HeadKind
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from model.loaded import LoadedModel
from model.manifest import (
    HeadSpec,
    load_manifest,
    sha256_file,
    write_manifest,
)
from tests.clusters import ClusterFactory
from tests.harness import Background, serving, wait_until
from workers.reload import reload_heads
from workers.settings import WorkerSettings

SOURCE_HEAD = "sentiment"


@pytest.fixture
def repo(model_repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(model_repo, copy)
    return copy


def publish_head(
    repo: Path, name: str, version: str, labels: tuple[str, ...], *, weight=None, checksum=None
) -> None:  # type: ignore[no-untyped-def]
    """Write a head's weights, then the manifest naming it (as `taskmux head train` does)."""
    manifest = load_manifest(repo, verify=False)
    source = manifest.head(SOURCE_HEAD)
    assert source is not None
    with np.load(repo / source.weights_file) as data:
        arrays = {k: data[k] for k in data.files}
    if weight is not None:
        arrays["weight"] = weight
    rel = f"heads/{name}/{version}/weights.npz"
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    np.savez(repo / rel, **arrays)
    spec = HeadSpec(name, HeadKind.CLASSIFICATION, version, labels, rel)
    heads = (*[h for h in manifest.heads if h.name != name], spec)
    checksums = {**manifest.checksums, rel: checksum or sha256_file(repo / rel)}
    write_manifest(repo, dataclasses.replace(manifest, heads=heads, checksums=checksums))


def test_reload_swaps_in_a_new_object_and_refuses_broken_heads(repo: Path) -> None:
    model = LoadedModel.load(WorkerSettings(model_repo=repo))
    publish_head(repo, "mood", "1", ("sad", "happy"))
    first = reload_heads(model, repo)
    assert "mood" in first.heads and "mood" not in model.heads  # the old object is untouched
    assert first.heads[SOURCE_HEAD] is model.heads[SOURCE_HEAD]  # unchanged heads are reused
    publish_head(repo, "mood", "2", ("sad", "happy"), checksum="0" * 64)
    second = reload_heads(first, repo)
    assert second.heads["mood"].spec.version == "1"
    publish_head(repo, "mood", "3", ("sad", "happy"), weight=np.zeros((2, 100), np.float32))
    third = reload_heads(second, repo)
    assert third.heads["mood"].spec.version == "1"
    assert third.manifest.head("mood") == first.heads["mood"].spec


@pytest.mark.integration
def test_heads_hot_reload_under_live_traffic(repo: Path, make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(start_redis=False, model_repo=repo)
    errors: list[str] = []
    answered = 0
    cluster.start_redis()
    worker = cluster.start_worker(reload_interval_ms="200", catalog_refresh_s="1")
    _, target = cluster.start_gateway(monitor_interval_ms="200")
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    stub = taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(target))
    wait_until(lambda: _heads(stub) >= {SOURCE_HEAD}, 60, "catalog")

    def traffic(stop: threading.Event) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                stub.Classify(
                    pb.ClassifyRequest(head=SOURCE_HEAD, texts=["a lovely day"]), timeout=10
                )
                answered += 1
            except grpc.RpcError as err:
                errors.append(f"{err.code()}: {err.details()}")

    with Background(traffic, name="traffic"):
        publish_head(repo, "mood", "1", ("sad", "happy"))
        wait_until(lambda: "mood" in _heads(stub), 20, "the new head in ListTasks")
        assert _classify(stub, "mood").head_version == "1"

        publish_head(repo, "mood", "2", ("gloomy", "cheerful"))
        wait_until(lambda: _classify(stub, "mood").head_version == "2", 20, "version 2 served")
        assert _classify(stub, "mood").results[0].label in {"gloomy", "cheerful"}

        publish_head(repo, "mood", "3", ("x", "y"), checksum="0" * 64)
        wait_until(lambda: "refusing head mood version 3" in worker.output(), 20, "refusal logged")
        publish_head(repo, "mood", "4", ("x", "y"), weight=np.zeros((2, 100), np.float32))
        wait_until(lambda: "refusing head mood version 4" in worker.output(), 20, "refusal logged")
        assert _classify(stub, "mood").head_version == "2"
        assert worker.popen.poll() is None
    assert not errors, errors[:5]
    assert answered > 0


def _heads(stub: taskmux_pb2_grpc.TaskMuxStub) -> set[str]:
    try:
        return {h.name for h in stub.ListTasks(pb.ListTasksRequest(), timeout=5).heads}
    except grpc.RpcError:
        return set()


def _classify(stub: taskmux_pb2_grpc.TaskMuxStub, head: str) -> pb.ClassifyResponse:
    return stub.Classify(pb.ClassifyRequest(head=head, texts=["what a day"]), timeout=10)


@pytest.mark.integration
def test_a_head_only_some_workers_serve_never_fails(
    repo: Path, model_repo: Path, make_cluster: ClusterFactory
) -> None:
    publish_head(repo, "mood", "1", ("sad", "happy"))
    cluster = make_cluster(start_redis=False, model_repo=repo)
    cluster.start_redis()
    cluster.start_worker()  # serves mood
    cluster.model_repo = model_repo
    cluster.start_worker()  # does not
    _, target = cluster.start_gateway(monitor_interval_ms="200")
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    stub = taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(target))
    wait_until(lambda: "mood" in _heads(stub), 60, "the union of both catalogs")
    for _ in range(20):
        assert _classify(stub, "mood").head == "mood"
        assert _classify(stub, SOURCE_HEAD).head == SOURCE_HEAD


@pytest.mark.integration
def test_a_head_trained_by_the_cli_is_served_without_a_restart(
    repo: Path, tmp_path: Path, make_cluster: ClusterFactory
) -> None:
    data = tmp_path / "tickets.jsonl"
    rows = [("the app crashes when I log in", "bug"), ("please add a dark mode", "feature")] * 20
    data.write_text(
        "".join(f'{{"text": "{t} {i}", "label": "{lab}"}}\n' for i, (t, lab) in enumerate(rows))
    )
    cluster = make_cluster(start_redis=False, model_repo=repo)
    cluster.start_redis()
    worker = cluster.start_worker(reload_interval_ms="200", catalog_refresh_s="1")
    _, target = cluster.start_gateway(monitor_interval_ms="200")
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    stub = taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(target))
    wait_until(lambda: SOURCE_HEAD in _heads(stub), 60, "catalog")
    run = subprocess.run(
        [sys.executable, "-m", "taskmux.cli", "head", "train", "--name", "ticket", "--data", str(data), "--repo", str(repo)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    wait_until(lambda: "ticket" in _heads(stub), 20, "the trained head in ListTasks")
    response = stub.Classify(
        pb.ClassifyRequest(head="ticket", texts=["it crashes on startup"]), timeout=10
    )
    assert response.results[0].label == "bug"
    assert worker.popen.poll() is None
