"""The peers report (bench/peers.py) reads every issue-15 goal against both raw baselines:
one multi-thread session (the issue's raw) and the worker's encoder with its replicas
(stricter). Figures are made up, except in the plumbing test, whose timings decide nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench import peers
from bench.peers import (
    BASELINES,
    CELLS,
    CpuLedger,
    PeerRuns,
    keep_better_baselines,
    measure_baselines,
    peers_lines,
)
from bench.raw import RawResult
from model.encoder import Encoder
from taskmux.loadtest.config import LoadConfig
from taskmux.loadtest.report import LoadReport, build_report
from taskmux.loadtest.samples import Samples
from workers.settings import WorkerSettings

ONE_SESSION = RawResult(2.4, 3.0, {1: 417.0, 8: 600.0, 16: 650.0, 32: 685.0, 64: 670.0})
# Batch 1 runs on the same session either way, so the replicas baseline shares it.
REPLICAS = RawResult(2.4, 3.0, {1: 417.0, 8: 720.0, 16: 790.0, 32: 825.0, 64: 800.0})

# What peers_lines prints for these figures: both baselines, ratios one session / replicas.
ROWS = (
    "| short | c=1 | 417 (1) | 417 (1) | 200 | 0.48 / 0.48 | 5.0 / 5.0 | 238 | 0.57 / 0.57 | 4.2 / 4.2 |",
    "| short | c=64 | 685 (32) | 825 (32) | 400 | 0.58 / 0.48 | 150.0 / 150.0 | 600 | 0.88 / 0.73 | 120.0 / 120.0 |",
    "| short | c=64, one text per call / raw best batch | >= 0.85 | 0.88 | yes | 0.73 | **no** |",
    "| short | c=1 p50 minus raw batch-1 p50 (ms) | <= +2 | +1.80 | yes | +1.80 | yes |",
    "| short | c=4, 32 texts per call / raw batch 32 | >= 0.95 | 0.98 | yes | 0.81 | **no** |",
)


def _report(texts_per_s: int, latency_ms: float, texts_per_call: int = 1) -> LoadReport:
    """A real LoadReport of calls spread over one measured second, all `latency_ms` long."""
    calls = texts_per_s // texts_per_call
    start = np.linspace(0.0, 0.5, calls)
    empty = np.zeros(0)
    samples = Samples(
        0.0, ("OK",), start, start + latency_ms / 1000, np.zeros(calls, np.int32),
        np.zeros(calls, np.int32), empty, np.zeros(0, np.int32),
    )  # fmt: skip
    config = LoadConfig(warmup_s=0.0, texts_per_request=texts_per_call)
    return build_report(
        config, (texts_per_call,), samples, last_send_s=1.0, elapsed_s=1.0,
        max_send_lag_s=0.0, interrupted=False,
    )  # fmt: skip


def _runs() -> PeerRuns:
    # c=64 and 32 texts per call meet their goals against one session, not against replicas;
    # c=1 is 1.8 ms over raw batch 1, within 2 ms against both.
    system = [_report(238, 4.2), _report(600, 120.0), _report(672, 180.0, 32)]
    plain = [_report(200, 5.0), _report(400, 150.0), _report(640, 190.0, 32)]
    by_cell = [
        {c.name: r for c, r in zip(CELLS, reports, strict=True)} for reports in (system, plain)
    ]
    return PeerRuns(
        raw={"short": REPLICAS}, one_session={"short": ONE_SESSION}, replicas=2,
        system={"short": by_cell[0]}, plain={"short": by_cell[1]},
    )  # fmt: skip


def test_each_goal_is_read_against_both_baselines() -> None:
    runs = _runs()
    one = runs.goals("short", "one_session")
    strict = runs.goals("short", "replicas")
    assert [g.value for g in one] == pytest.approx([600 / 685, 4.2 - 2.4, 672 / 685])
    assert [g.met for g in one] == [True, True, True]
    # The best batch differs by baseline: 32 for both here, at 685 and 825 texts/s.
    assert [g.value for g in strict] == pytest.approx([600 / 825, 4.2 - 2.4, 672 / 825])
    assert [g.met for g in strict] == [False, True, False]
    assert runs.goals("short") == strict  # the default, as results.json's "goals" had it


def test_results_keep_their_keys_and_add_the_one_session_baseline() -> None:
    figures = _runs().to_dict()
    assert set(figures) >= {"raw", "plain", "system", "goals", "profile_top_frames"}
    assert figures["raw"]["short"]["throughput_by_batch"][32] == 825.0  # type: ignore[index]
    assert figures["raw_one_session"]["short"]["best_batch"] == 32  # type: ignore[index]
    assert figures["encoder_replicas"] == 2
    goals = figures["goals"]["short"]  # type: ignore[index]
    assert goals["c=64, one text per call / raw best batch"] == pytest.approx(600 / 825)
    by_baseline = figures["goals_by_baseline"]
    assert set(by_baseline) == set(BASELINES)  # type: ignore[arg-type]
    batch = by_baseline["one_session"]["short"]["c=4, 32 texts per call / raw batch 32"]  # type: ignore[index]
    assert batch["value"] == pytest.approx(672 / 685) and batch["met"] is True
    assert by_baseline["replicas"]["short"]["c=4, 32 texts per call / raw batch 32"]["met"] is False  # type: ignore[index]


def test_the_report_names_each_baseline_and_its_verdicts() -> None:
    lines = peers_lines(_runs(), 8.0, "Measured in a test.")
    text = "\n".join(lines)
    assert "**one session (the issue's raw)**" in text
    assert "**the worker's encoder with replicas (stricter)**" in text
    assert "here 2 single-thread replicas" in text
    for row in ROWS:
        assert row in lines
    assert (
        "Goals met: 3 of 3 against one session (the issue's raw); 1 of 3 against the "
        "worker's encoder with replicas (stricter)."
    ) in lines


@pytest.mark.parametrize("replicas", [2, 1])
def test_the_replicas_baseline_shares_small_batches_and_measures_big_ones(
    model_repo: Path, replicas: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured: list[tuple[str, int, tuple[int, ...]]] = []  # (what, replicas, batches)

    def spy(name: str) -> object:
        real = getattr(peers, name)

        def measure(
            encoder: Encoder, texts: Sequence[str], batches: Sequence[int], d: float
        ) -> object:
            replicas = len(encoder.replicas.copies) if encoder.replicas else 1
            measured.append((name, replicas, tuple(batches)))
            return real(encoder, texts, batches, d)

        return measure

    for name in ("measure_raw", "measure_throughput"):
        monkeypatch.setattr(peers, name, spy(name))
    monkeypatch.setattr(peers, "TEXT_SETS", {"short": "12"})
    monkeypatch.setattr(peers, "RAW_BATCHES", (1, 8))
    settings = replace(
        WorkerSettings(), model_repo=model_repo, providers=("CPUExecutionProvider",),
        intra_op_threads=2, encoder_replicas=replicas,
    )  # fmt: skip
    runs = PeerRuns()
    measure_baselines(runs, settings, 0.2)

    assert runs.replicas == replicas
    one, strict = runs.one_session["short"], runs.raw["short"]
    assert list(one.throughput_by_batch) == list(strict.throughput_by_batch) == [1, 8]
    # Batch 1 runs on the same multi-thread session both ways: measured once, shared.
    assert strict.batch1_p50_ms == one.batch1_p50_ms
    assert strict.throughput_by_batch[1] == one.throughput_by_batch[1]
    if replicas == 1:  # the worker's default is then one session too: nothing to measure
        assert strict == one
        assert measured == [("measure_raw", 1, (1, 8))] * 2
    else:  # one session at every batch, then the replicas at 8 and more; both spin settings
        assert measured == [("measure_raw", 1, (1, 8))] * 2 + [("measure_throughput", 2, (8,))] * 2


def test_raw_measured_twice_keeps_the_better_figure_of_each_cell() -> None:
    runs = _runs()
    slower = RawResult(2.9, 3.5, {b: v * 0.9 for b, v in ONE_SESSION.throughput_by_batch.items()})
    faster = RawResult(2.2, 2.8, {**REPLICAS.throughput_by_batch, 32: 900.0})
    keep_better_baselines(runs, PeerRuns(one_session={"short": slower}, raw={"short": faster}))
    assert runs.one_session["short"].throughput_by_batch == ONE_SESSION.throughput_by_batch
    assert runs.one_session["short"].batch1_p50_ms == 2.4
    assert runs.raw["short"].throughput_by_batch[32] == 900.0
    assert runs.raw["short"].throughput_by_batch[8] == 720.0
    assert runs.raw["short"].batch1_p50_ms == 2.2


def test_goal_one_reads_as_a_cpu_budget_that_every_process_shares() -> None:
    runs = replace(_runs(), cpu=CpuLedger(LEDGER, 518.0, 2))
    assert runs.cpu is not None
    assert runs.cpu.total_ms == pytest.approx(3.76)
    assert runs.cpu.busy_cores == pytest.approx(3.76 * 518 / 1000)
    # 2 cores at 0.85 of 685 texts/s (one session's best batch): 2000 / 582.25 ms per call.
    assert runs.cpu.budget_ms(0.85 * 685) == pytest.approx(3.435, abs=1e-3)
    text = "\n".join(peers_lines(runs, 8.0, "Measured in a test."))
    assert "worker 2.80 ms, gateway 0.66 ms, Valkey 0.15 ms, load generator 0.15 ms" in text
    assert "3.76 ms in all, 1.95 of 2 cores busy at 518 calls/s" in text
    assert "at most 3.43 ms against one session (0.85 x 685 = 582 calls/s)" in text
    assert "and 2.85 ms against replicas (0.85 x 825 = 701 calls/s)" in text
    assert runs.to_dict()["cpu_per_call_c64_short"]["ms_per_call"] == LEDGER  # type: ignore[index]


def test_the_echo_server_shows_what_grpc_alone_costs_beside_the_gateway() -> None:
    echo = CpuLedger({peers.ECHO: 0.18, peers.LOAD_GENERATOR: 0.15}, 4900.0, 2)
    runs = replace(_runs(), cpu=CpuLedger(LEDGER, 518.0, 2), echo_cpu=echo)
    text = "\n".join(peers_lines(runs, 8.0, "Measured in a test."))
    assert "the server 0.18 ms per call (taskmux's gateway: 0.66 ms)" in text
    assert "the load generator 0.15 ms, at 4900 calls/s" in text
    figures = runs.to_dict()["echo_cpu_per_call_c64_short"]
    assert figures["ms_per_call"][peers.ECHO] == 0.18  # type: ignore[index]


def test_no_ledger_no_budget_line() -> None:
    assert not any("CPU per call" in line for line in peers_lines(_runs(), 8.0, "In a test."))


LEDGER = {"worker": 2.80, "gateway": 0.66, "Valkey": 0.15, "load generator": 0.15}
