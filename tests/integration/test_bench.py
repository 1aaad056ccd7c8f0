"""The security bench (bench/security.py) exercises what its report claims, on a tiny run:
b to d refuse a wrong key, c and d charge the limiter in Redis, d exports spans, a stays
open; and its section merges into the report without touching the others. The workers
bench (bench/workers.py) runs in miniature and merges its section and figures. No timing."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client.channel import auth_metadata, open_channel

from bench.report import WORKERS_HEADING, merge_section
from bench.run import main as bench_main
from bench.security import (
    TENANT,
    Deployment,
    charged_units,
    deployments,
    exported_spans,
    measure,
)


def _embed(d: Deployment, *, tls: bool, api_key: str | None) -> grpc.StatusCode:
    credentials = d.security.tls.credentials() if tls and d.security.tls else None
    with open_channel(d.target, credentials, ()) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        try:
            stub.Embed(pb.EmbedRequest(texts=["hi"]), timeout=10, metadata=auth_metadata(api_key))
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def _limit_keys(d: Deployment) -> set[str]:
    with redis.Redis.from_url(d.redis_url, decode_responses=True) as client:
        return set(client.scan_iter(f"taskmux:v1:limit:{TENANT}:*"))


@pytest.mark.integration
def test_each_configuration_does_what_the_report_says(model_repo: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with deployments(model_repo, tmp_path, work) as running:
        by_name = {d.variant.name: d for d in running}
        runs = measure(running, rounds=1, duration_s=0.3, warmup_s=0.0)
        assert _embed(by_name["a"], tls=False, api_key=None) == grpc.StatusCode.OK
        for name in "bcd":
            d = by_name[name]
            assert _embed(d, tls=True, api_key=d.security.api_key) == grpc.StatusCode.OK
            assert _embed(d, tls=True, api_key="wrong") == grpc.StatusCode.UNAUTHENTICATED
            assert _embed(d, tls=True, api_key=None) == grpc.StatusCode.UNAUTHENTICATED
            assert _embed(d, tls=False, api_key=d.security.api_key) == grpc.StatusCode.UNAVAILABLE
        limit_keys = {name: _limit_keys(d) for name, d in by_name.items()}
        charged = {name: charged_units(d.redis_url) for name, d in by_name.items()}
    spans = {name: exported_spans(d.spans) for name, d in by_name.items()}

    calls = {}
    for name in by_name:
        reports = [*runs.latency[name], *runs.throughput[name]]
        assert all(r.sent > 0 and r.errors == 0 for r in reports), name
        calls[name] = sum(r.sent for r in reports)
    rate_and_quota = {f"taskmux:v1:limit:{TENANT}:rate", f"taskmux:v1:limit:{TENANT}:quota"}
    assert limit_keys == {"a": set(), "b": set(), "c": rate_and_quota, "d": rate_and_quota}
    # Every measured call was charged one unit; warm-up and the probes above add some.
    assert charged["a"] == charged["b"] == 0
    assert charged["c"] > calls["c"] and charged["d"] > calls["d"]
    gateway_spans, worker_spans = spans["d"]
    assert gateway_spans > calls["d"] and worker_spans > calls["d"]
    assert spans["a"] == spans["b"] == spans["c"] == (0, 0)


def test_a_merged_section_replaces_its_own_and_keeps_the_rest(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    report.write_text("# bench\n\n## Ratios\n\nkept\n\n## Profile\n\nkept too\n")
    merge_section(report, ["## Security", "", "first"])
    merge_section(report, ["## Security", "", "second"])
    assert report.read_text() == (
        "# bench\n\n## Ratios\n\nkept\n\n## Profile\n\nkept too\n\n## Security\n\nsecond\n"
    )
    report.write_text("# bench\n\n## Security\n\nold\n\n## Profile\n\nkept\n")
    merge_section(report, ["## Security", "", "new", ""])
    assert report.read_text() == "# bench\n\n## Security\n\nnew\n\n## Profile\n\nkept\n"


@pytest.mark.integration
def test_the_workers_part_merges_its_section_and_figures(model_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "report.md").write_text("# taskmux bench\n\n## Ratios\n\nkept\n")
    (tmp_path / "results.json").write_text(json.dumps({"raw": {"kept": True}}))
    code = bench_main([
        "--repo", str(model_repo), "--out", str(tmp_path), "--only", "workers",
        "--soak-s", "4", "--steady-callers", "4", "--burst-callers", "12", "--burst-calls", "2",
    ])  # fmt: skip
    assert code == 0
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# taskmux bench\n\n## Ratios\n\nkept\n\n" + WORKERS_HEADING)
    assert "--only workers" in report and "nproc" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["raw"] == {"kept": True}
    workers = results["workers"]
    burst, steady = workers["burst"], workers["steady"]
    assert len(workers["workers"]) == 3 and set(burst["shares"]) == set(workers["workers"])
    assert sum(burst["shares"].values()) == pytest.approx(1.0)
    assert burst["ok"] == 24 and not burst["errors"] and sum(burst["jobs"].values()) >= 24
    assert burst["samples"] > 0 and burst["most_outstanding"] >= burst["most_held"]
    assert steady["ok"] > 0 and not steady["errors"] and steady["calls_per_s"] > 0
    assert steady["idempotency_ttl_s"] == 60 and len(steady["memory"]) >= 2
    # Keyed calls: every one left its record (none can have expired in a 4 s run).
    assert steady["idempotency_records_end"] >= steady["ok"]
    assert steady["bytes_per_record"] > 0 and "plateau" in steady
    assert steady["second_half_min"] <= steady["second_half_max"]
    for figure in (f"{steady['ok']} calls", f"{burst['ok']} calls answered"):
        assert figure in report
    assert (tmp_path / "workers_memory.png").read_bytes()[:4] == b"\x89PNG"
