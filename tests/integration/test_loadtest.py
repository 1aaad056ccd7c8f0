"""`taskmux loadtest`: specs, texts, percentiles, arrivals, and real runs against a cluster."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import socket
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2 as pb

from router import keys
from taskmux.cli import _parser
from taskmux.cli import main as taskmux_main
from taskmux.loadtest import (
    ConfigError,
    LoadConfig,
    LoadReport,
    MixEntry,
    format_lengths,
    format_mix,
    parse_lengths,
    parse_mix,
    percentile,
    run_load,
)
from taskmux.loadtest.calls import prepare_tasks
from taskmux.loadtest.cli import config_from_args
from taskmux.loadtest.progress import Progress
from taskmux.loadtest.report import build_report
from taskmux.loadtest.samples import LiveStatus, Recorder
from taskmux.loadtest.schedule import Picker, poisson_arrivals
from taskmux.loadtest.texts import TextGenerator
from taskmux.local import free_port
from tests.clusters import ClusterFactory

FULL_MIX = (
    "embed=2,classify:sentiment=1,analyze:embed+sentiment+topic+intent=1,entities=1,"
    "similarity=1,zero-shot=1"
)

# ---------------------------------------------------------------- mix and lengths specs


def test_mix_spec_parses_every_task_with_weights_and_arguments() -> None:
    mix = parse_mix(FULL_MIX)
    assert [e.label for e in mix] == [
        "embed",
        "classify:sentiment",
        "analyze:embed+sentiment+topic+intent",
        "entities",
        "similarity",
        "zero-shot",
    ]
    assert [e.weight for e in mix] == [2, 1, 1, 1, 1, 1]
    assert mix[2].args == ("embed", "sentiment", "topic", "intent")
    assert parse_mix(" similarity:3 = 0.5 , zero-shot:a+b ,entities:ner") == (
        MixEntry("similarity", ("3",), 0.5),
        MixEntry("zero-shot", ("a", "b")),
        MixEntry("entities", ("ner",)),
    )
    assert parse_mix(format_mix(mix)) == mix


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "mix entry 1 is empty"),
        ("embed,,classify:sentiment", "mix entry 2 is empty"),
        ("summarize", "unknown task 'summarize'; one of embed, classify"),
        ("classify", "classify needs a head, e.g. classify:sentiment"),
        ("classify:", "nothing after ':'"),
        ("classify:a+b", "takes one head"),
        ("embed:fast", "embed takes no argument"),
        ("embed=0", "weight must be a positive number"),
        ("embed=-1", "weight must be a positive number"),
        ("embed=lots", "weight 'lots' is not a number"),
        ("=2", "nothing before '='"),
        ("analyze", "analyze needs heads"),
        ("analyze:embed+", "empty head"),
        ("analyze:embed+embed", "a head is repeated"),
        ("zero-shot:only", "at least 2 labels"),
        ("similarity:many", "number of candidates"),
        ("similarity:0", "number of candidates"),
        ("similarity:²", "number of candidates"),
        ("embed=1,embed=2", "mix entry 2 'embed=2': embed is listed twice"),
    ],
)
def test_bad_mix_specs_name_the_entry_and_the_fix(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_mix(spec)
    assert message in str(err.value)


def test_lengths_spec() -> None:
    assert parse_lengths("8, 32=2,128") == ((8, 1.0), (32, 2.0), (128, 1.0))
    assert parse_lengths(format_lengths(((5, 0.5),))) == ((5, 0.5),)
    for spec, message in [
        ("0", "at least 1 word"),
        ("long", "number of words"),
        ("8=x", "not a number"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_lengths(spec)
        assert message in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "open"}, "open loop needs a rate"),
        ({"duration_s": None}, "set a duration, a number of requests, or both"),
        ({"concurrency": 0}, "concurrency >= 1"),
        ({"connections": 0}, "connections must be >= 1"),
        ({"deadline_s": 0}, "deadline must be > 0"),
        ({"mix": ()}, "the mix is empty"),
    ],
)
def test_config_refuses_what_cannot_run(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        LoadConfig(**kwargs)  # type: ignore[arg-type]
    assert message in str(err.value)


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["loadtest", *argv])


def test_cli_options_make_the_config() -> None:
    closed = config_from_args(_args("--mix", "embed=2,classify:sentiment"))
    assert (closed.mode, closed.concurrency, closed.duration_s) == ("closed", 8, 10.0)
    assert closed.mix == parse_mix("embed=2,classify:sentiment")
    opened = config_from_args(_args("--rate", "50", "--requests", "100", "--connections", "3"))
    assert (opened.mode, opened.rate, opened.requests, opened.duration_s) == ("open", 50, 100, None)
    assert opened.connections == 3
    assert closed.idempotency_keys and closed.to_dict()["idempotency_keys"] is True
    assert not config_from_args(_args("--no-idempotency-keys")).idempotency_keys
    with pytest.raises(ConfigError, match="--rate is for the open loop"):
        config_from_args(_args("--mode", "closed", "--rate", "5"))


def test_cli_rejects_a_bad_mix_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        taskmux_main(["loadtest", "--mix", "classify"])
    assert exit_info.value.code == 2
    assert "classify needs a head" in capsys.readouterr().err


# ---------------------------------------------------------------- texts and requests


def test_texts_are_deterministic_by_seed_and_exact_in_length() -> None:
    first = [TextGenerator(7).text(n) for n in (1, 8, 32, 128)]
    assert first == [TextGenerator(7).text(n) for n in (1, 8, 32, 128)]
    a, b = TextGenerator(7), TextGenerator(8)
    assert [a.text(16) for _ in range(5)] != [b.text(16) for _ in range(5)]
    gen = TextGenerator(1)
    for n in (1, 2, 8, 31, 128, 300):
        text = gen.text(n)
        assert len(text.split()) == n
        assert text[0].isupper() and text[-1] in ".?!"
        assert all(ch.isalpha() or ch in " .,?!" for ch in text), text


def test_prepared_requests_follow_the_mix_and_the_seed() -> None:
    config = LoadConfig(mix=parse_mix(FULL_MIX), texts_per_request=3, distinct_requests=5, seed=4)
    tasks = prepare_tasks(config)
    assert [t.rpc for t in tasks] == [
        "Embed", "Classify", "Analyze", "ExtractEntities", "Similarity", "ZeroShotClassify"
    ]  # fmt: skip
    assert [t.streaming for t in tasks] == [False, False, True, False, False, False]
    assert [t.texts for t in tasks] == [3, 3, 3, 3, 9, 3]
    assert all(len(t.requests) == 5 for t in tasks)
    classify = tasks[1].requests[0]
    assert isinstance(classify, pb.ClassifyRequest)
    assert classify.head == "sentiment" and len(classify.texts) == 3
    similarity = tasks[4].requests[0]
    assert isinstance(similarity, pb.SimilarityRequest) and len(similarity.candidates) == 8
    again = prepare_tasks(config)
    assert [t.requests for t in again] == [t.requests for t in tasks]


# ---------------------------------------------------------------- percentiles and the report


def test_nearest_rank_percentiles() -> None:
    ten = [float(i) for i in range(1, 11)]
    assert [percentile(ten, q) for q in (0, 50, 90, 99, 100)] == [1, 5, 9, 10, 10]
    thousand = [float(i) for i in range(1, 1001)]
    assert percentile(thousand, 99.9) == 999 and percentile(thousand, 99) == 990
    assert percentile([3.0], 99.9) == 3
    with pytest.raises(ValueError):
        percentile([], 50)


def test_report_counts_errors_in_latency_and_leaves_out_the_warm_up() -> None:
    config = LoadConfig(mix=parse_mix("embed,classify:sentiment"), warmup_s=1.0)
    rec = Recorder(t0=100.0, warmup_s=1.0)
    for i in range(5):  # warm-up: left out of everything
        rec.started(100.1)
        rec.finished(0, 100.1, 100.2 + i, "OK", "")
    for i in range(98):  # 98 fast successes of 10 ms
        rec.started(101.0 + i * 0.01)
        rec.finished(i % 2, 101.0 + i * 0.01, 101.01 + i * 0.01, "OK", "")
    for code in ("DEADLINE_EXCEEDED", "UNAVAILABLE"):  # 2 slow failures of 2 s
        rec.started(101.0)
        rec.finished(1, 101.0, 103.0, code, f"{code} details")
    assert rec.sent == rec.ok + rec.errors == 105
    report = build_report(
        config, (1, 1), rec.samples(), last_send_s=2.0, elapsed_s=3.0, max_send_lag_s=0.0,
        interrupted=False,
    )  # fmt: skip
    assert (report.sent, report.ok, report.errors, report.warmup_calls) == (100, 98, 2, 5)
    assert report.errors_by_code == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert report.error_examples["UNAVAILABLE"] == "UNAVAILABLE details"
    assert report.latency.count == 100 and report.latency_ok.count == 98
    assert report.latency.max_ms == pytest.approx(2000) and report.latency.p99_ms == pytest.approx(
        2000
    )
    assert report.latency_ok.p99_ms == pytest.approx(
        10
    ) and report.latency_ok.max_ms == pytest.approx(10)
    assert report.measured_s == pytest.approx(2.0)  # warm-up end (1 s) to the last answer (3 s)
    assert report.requests_per_s == pytest.approx(50) and report.texts_per_s == pytest.approx(49)
    by_task = {t.label: t for t in report.by_task}
    assert by_task["classify:sentiment"].errors == 2 and by_task["embed"].errors == 0
    assert sum(t.sent for t in report.by_task) == report.sent
    assert sum(report.timeline.ok_per_s) * report.timeline.bucket_s == 103
    json.dumps(report.to_dict())


# ---------------------------------------------------------------- arrivals and picks


def test_poisson_arrivals_have_exponential_gaps_with_mean_one_over_rate() -> None:
    rate = 250.0
    arrivals = poisson_arrivals(rate, random.Random(11))
    times = np.array([next(arrivals) for _ in range(50_000)])
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)  # exponential: CV = 1
    per_second = np.bincount(times.astype(int))[:-1]  # Poisson counts: variance = mean
    assert statistics.variance(per_second) / per_second.mean() == pytest.approx(1.0, abs=0.35)
    again = poisson_arrivals(rate, random.Random(11))
    assert [next(again) for _ in range(100)] == list(times[:100])


def test_picker_follows_the_weights_and_cycles_each_pool() -> None:
    picker = Picker([3.0, 1.0], [4, 2], seed=5)
    picks = [picker.pick() for _ in range(8000)]
    counts = Counter(task for task, _ in picks)
    assert counts[0] / len(picks) == pytest.approx(0.75, abs=0.02)
    assert [i for task, i in picks if task == 1][:5] == [0, 1, 0, 1, 0]


def test_progress_redraws_on_a_terminal_and_logs_lines_otherwise() -> None:
    config = LoadConfig(duration_s=10.0, warmup_s=1.0)
    tty = io.StringIO()
    bar = Progress(config, tty, tty=True)
    bar(LiveStatus(0.5, 10, 9, 0, 0, 1, 0))
    bar(LiveStatus(6.0, 1010, 1000, 5, 0, 5, 900))
    bar.close()
    out = tty.getvalue()
    assert out.startswith("\rwarm-up") and "[############............]  50%" in out
    assert "181.1 req/s" in out and "18.0 req/s" in out and "errors 5" in out and out.endswith("\n")
    log = io.StringIO()
    lines = Progress(config, log, tty=False)
    for t in (1.0, 2.0, 5.5, 6.0, 11.0):
        lines(LiveStatus(t, 0, 0, 0, 0, 0, 0))
    assert len(log.getvalue().splitlines()) == 2 and "\r" not in log.getvalue()


# ---------------------------------------------------------------- against a real cluster


@pytest.fixture(scope="module")
def deployment(make_shared_cluster: ClusterFactory) -> tuple[str, str]:
    """(gateway address, Redis URL) of a Valkey, one worker and one gateway."""
    cluster = make_shared_cluster(gateways=1, ready="catalog")
    return cluster.gateways[0].address, cluster.redis_url


@pytest.fixture(scope="module")
def target(deployment: tuple[str, str]) -> str:
    return deployment[0]


@pytest.mark.integration
def test_closed_loop_from_the_cli_writes_json_and_png(target: str, tmp_path: Path) -> None:
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    code = taskmux_main([
        "loadtest", "--target", target, "--concurrency", "4", "--duration", "2",
        "--warmup", "0.5", "--mix", "embed=2,classify:sentiment", "--lengths", "8,32",
        "--connections", "2", "--json", str(out), "--plot", str(png), "--quiet",
    ])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 0, report["errors_by_code"]
    assert report["sent"] > 0 and report["sent"] == report["ok"] + report["errors"]
    assert report["errors"] == 0 and report["dropped"] == 0
    assert set(report["by_task"]) == {"embed", "classify:sentiment"}
    assert sum(t["sent"] for t in report["by_task"].values()) == report["sent"]
    assert report["latency_ms"]["count"] == report["sent"]
    assert report["throughput"]["texts_per_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_open_loop_sends_every_task_of_the_mix_without_errors(target: str) -> None:
    config = LoadConfig(
        target=target, mode="open", rate=25.0, duration_s=2.0, warmup_s=0.0,
        mix=parse_mix(FULL_MIX), lengths=parse_lengths("8,32"), texts_per_request=2, seed=3,
    )  # fmt: skip
    report = asyncio.run(run_load(config))
    assert report.errors == 0, (report.errors_by_code, report.error_examples)
    assert report.sent > 0 and report.sent == report.ok + report.errors
    assert report.dropped == 0 and report.warmup_calls == 0
    assert all(t.sent > 0 and t.ok == t.sent for t in report.by_task), report.by_task


@pytest.mark.integration
def test_a_request_budget_sends_exactly_that_many(target: str) -> None:
    config = LoadConfig(
        target=target, concurrency=4, duration_s=None, requests=30, warmup_s=0.0,
        lengths=parse_lengths("8"),
    )  # fmt: skip
    report = asyncio.run(run_load(config))
    assert (report.sent, report.ok) == (30, 30)


def _idempotency_records(redis_url: str) -> set[str]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        return set(client.scan_iter(f"{keys.PREFIX}idem:*", count=1000))


@pytest.mark.integration
def test_keyed_load_leaves_one_idempotency_record_per_call_and_unkeyed_none(
    deployment: tuple[str, str],
) -> None:
    target, redis_url = deployment
    before = _idempotency_records(redis_url)
    unkeyed = LoadConfig(
        target=target, concurrency=4, duration_s=None, requests=12, warmup_s=0.0,
        lengths=parse_lengths("8"), texts_per_request=2, idempotency_keys=False,
    )  # fmt: skip
    report = asyncio.run(run_load(unkeyed))
    assert (report.sent, report.ok) == (12, 12)
    assert _idempotency_records(redis_url) - before == set()
    keyed = replace(unkeyed, idempotency_keys=True)
    assert LoadConfig().idempotency_keys, "keys are the default, as in taskmux_client"
    report = asyncio.run(run_load(keyed))
    assert (report.sent, report.ok) == (12, 12)
    # A fresh key per call, though the 12 calls reuse prebuilt requests: one record each.
    added = _idempotency_records(redis_url) - before
    assert len(added) == 12 and all(k.startswith(f"{keys.PREFIX}idem:embed:") for k in added)


def test_a_closed_port_gives_unavailable_and_the_run_still_ends() -> None:
    ticks: list[LiveStatus] = []
    config = LoadConfig(
        target=f"127.0.0.1:{free_port()}", concurrency=2, duration_s=1.0, warmup_s=0.2,
        deadline_s=2.0,
    )  # fmt: skip
    report = asyncio.run(run_load(config, on_tick=ticks.append, tick_s=0.2))
    assert report.sent > 0 and report.ok == 0 and report.sent == report.errors
    assert set(report.errors_by_code) == {"UNAVAILABLE"}
    assert report.latency.count == report.sent and report.latency_ok.count == 0
    assert ticks and ticks[-1].errors == report.errors + report.warmup_calls


@pytest.fixture
def silent_target() -> Iterator[str]:
    """An address that accepts TCP connections and never answers (a hung server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_open_loop_drops_arrivals_over_the_cap_and_deadlines_end_hung_calls(
    silent_target: str,
) -> None:
    config = LoadConfig(
        target=silent_target, mode="open", rate=200.0, duration_s=0.3, warmup_s=0.0,
        max_outstanding=5, deadline_s=2.0, connections=2,
    )  # fmt: skip
    report = asyncio.run(run_load(config))
    assert (report.sent, report.ok) == (5, 0)  # no call ends before the schedule does
    assert report.errors_by_code == {"DEADLINE_EXCEEDED": 5}
    assert report.dropped > 0 and report.by_task[0].dropped == report.dropped
    assert report.latency.count == 5 and report.latency.p50_ms is not None


def test_the_stop_event_ends_a_long_run_early(silent_target: str) -> None:
    async def run() -> LoadReport:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        config = LoadConfig(target=silent_target, concurrency=2, duration_s=600, deadline_s=1.0)
        return await run_load(config, stop=stop)

    report = asyncio.run(run())
    assert report.interrupted and report.warmup_calls == 2 and report.sent == 0
    assert report.errors_by_code == {}  # the two calls were warm-up calls
