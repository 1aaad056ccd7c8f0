"""User heads end to end: heads trained by the CLI on the multi-task branch and on a branch
of their own, served by a running worker without a restart, with what each costs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from model.manifest import EMBEDDING, MULTITASK, load_manifest
from tests.clusters import ClusterFactory
from tests.harness import serving, wait_until
from tests.unit.test_user_heads import write_reviews

pytestmark = pytest.mark.integration

PROBES = ["the ending was superb", "the cast was tedious", "I loved it", "what a waste of time"]


@pytest.fixture
def repo(model_repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(model_repo, copy)
    return copy


def _train(repo: Path, data: Path, name: str, *flags: str) -> dict[str, object]:
    run = subprocess.run(
        [sys.executable, "-m", "taskmux.cli", "head", "train", "--name", name, "--data", str(data),
         "--repo", str(repo), *flags],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report: dict[str, object] = json.loads(run.stdout)
    return report


def _classify(stub: taskmux_pb2_grpc.TaskMuxStub, head: str) -> list[tuple[str, float]]:
    response = stub.Classify(pb.ClassifyRequest(head=head, texts=PROBES), timeout=20)
    return [(r.label, r.score) for r in response.results]


def _heads(stub: taskmux_pb2_grpc.TaskMuxStub) -> dict[str, pb.HeadInfo]:
    try:
        return {h.name: h for h in stub.ListTasks(pb.ListTasksRequest(), timeout=5).heads}
    except grpc.RpcError:
        return {}


def test_heads_on_the_multitask_branch_and_on_their_own_are_served_without_a_restart(
    repo: Path, tmp_path: Path, make_cluster: ClusterFactory
) -> None:
    data = write_reviews(tmp_path / "reviews.jsonl")
    cluster = make_cluster(start_redis=False, model_repo=repo)
    cluster.start_redis()
    worker = cluster.start_worker(reload_interval_ms="200", catalog_refresh_s="1")
    _, target = cluster.start_gateway(monitor_interval_ms="200")
    wait_until(lambda: serving(target), 30, "gateway SERVING")
    stub = taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(target))
    wait_until(lambda: "sentiment" in _heads(stub), 60, "catalog")
    before = _classify(stub, "sentiment")

    _train(repo, data, "mt-reviews", "--features", MULTITASK)
    tuned = _train(repo, data, "ft-reviews", "--fine-tune")
    branch = f"ft-reviews-v{tuned['version']}"
    assert tuned["features"] == branch and tuned["features_cost"] == pytest.approx(0.6667)
    encoder = load_manifest(repo).encoder  # verifies the branch's files in every variant
    assert encoder.parts[branch].layers == 4
    assert all(branch in v.parts for v in encoder.variants.values()) and encoder.variants

    wait_until(lambda: {"mt-reviews", "ft-reviews"} <= _heads(stub).keys(), 30, "both heads")
    heads = _heads(stub)
    assert heads["mt-reviews"].features == MULTITASK
    assert heads["ft-reviews"].features == branch
    assert heads["ft-reviews"].metrics["heldout_accuracy"] >= 0.8
    assert heads["ft-reviews"].features_cost == pytest.approx(0.6667)
    for head in heads.values():  # layer counts were recorded with the branch
        assert head.features in (EMBEDDING, MULTITASK, branch), head.name
        assert head.features_cost == pytest.approx(0.6667), head.name

    labels = [label for label, _ in _classify(stub, "ft-reviews")]
    assert labels[:2] == ["pos", "neg"]
    assert [label for label, _ in _classify(stub, "mt-reviews")][:2] == ["pos", "neg"]
    after = _classify(stub, "sentiment")
    assert [a for a, _ in after] == [b for b, _ in before]
    assert [s for _, s in after] == pytest.approx([s for _, s in before], abs=1e-5)
    assert "encoder branches: opened ['" + branch + "']" in worker.output()
    assert worker.popen.poll() is None
