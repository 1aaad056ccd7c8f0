"""Side by side in one run: raw ONNX Runtime, a plain gRPC server, and taskmux.

The plain server (bench/plain_server.py) is what serving the encoder costs without a
queue or batching; taskmux (`taskmux up` defaults) is measured in the same run, cell by
cell, one right after the other, so that drift on a shared machine falls on both. Short
texts (SHORT_WORDS words, about 16 tokens) and mixed lengths are reported apart: with
short texts the encoder is cheap and the work around it dominates.

Cells: one text per call at c=1 (latency) and at c=64 (throughput under load), and 32
texts per call at c=4 (batch RPCs). Each is read against raw ONNX Runtime on the same
texts: c=1 against batch 1, c=64 against its best batch, 32 texts against batch 32.

Raw ONNX Runtime is measured two ways, and every goal is read against both: one
multi-thread session (the worker's `Encoder` with replicas off), as issue 15 measured it
and as the obvious in-process code runs it; and the worker's own encoder with its
single-thread replicas (model/replicas.py), which is faster at big batches and so a
stricter baseline.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

import grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client.channel import open_channel

from bench.raw import RawResult, best_of, measure_raw, measure_throughput
from bench.system import (
    child_pid,
    children,
    cpu_seconds,
    interrupt,
    load,
    profile,
    running_system,
    top_frames,
)
from model.encoder import Encoder
from model.loaded import LoadedModel
from model.replicas import MIN_REPLICA_ROWS
from taskmux.loadtest.config import parse_lengths
from taskmux.loadtest.report import LoadReport
from taskmux.loadtest.texts import TextGenerator
from taskmux.local import free_port
from workers.settings import WorkerSettings

SHORT_WORDS = 12  # about 16 tokens with [CLS] and [SEP], as intent and sentiment traffic is
TEXT_SETS = {"short": str(SHORT_WORDS), "mixed": "6,24,96"}
RAW_BATCHES = (1, 8, 16, 32, 64)
BATCH_TEXTS = 32

# The issue-15 goals: system/raw ratios and the c=1 latency margin.
THROUGHPUT_GOAL = 0.85
LATENCY_GOAL_MS = 2.0
BATCH_GOAL = 0.95

Baseline = Literal["one_session", "replicas"]
BASELINES: dict[Baseline, str] = {
    "one_session": "one session (the issue's raw)",
    "replicas": "the worker's encoder with replicas (stricter)",
}


@dataclass(frozen=True)
class Cell:
    """One load: callers, and texts per call."""

    name: str
    concurrency: int
    texts_per_call: int


CELLS = (Cell("c=1", 1, 1), Cell("c=64", 64, 1), Cell(f"c=4 x{BATCH_TEXTS}", 4, BATCH_TEXTS))


# Where the CPU is counted: taskmux's processes from /proc; the load generator runs in
# the bench's own process.
LOAD_GENERATOR = "load generator"
ECHO = "gRPC server answering from memory"


@dataclass(frozen=True)
class CpuLedger:
    """CPU time per call that each process spent under one load, and the cores they share:
    the goals are ratios to raw ONNX Runtime on all of this machine's cores, and every
    process here (load generator included) runs on those same cores."""

    ms_per_call: dict[str, float]  # process -> CPU ms per call
    calls_per_s: float
    cores: int

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_call.values())

    @property
    def busy_cores(self) -> float:
        return self.total_ms * self.calls_per_s / 1000

    def budget_ms(self, calls_per_s: float) -> float:
        """The most CPU per call, all processes together, at which the cores could serve
        `calls_per_s`: what every process must fit into for a goal of that rate."""
        return 1000 * self.cores / calls_per_s


class Goal(NamedTuple):
    """One issue-15 goal read against one baseline."""

    name: str
    value: float
    target: str
    met: bool


@dataclass
class PeerRuns:
    """Everything one side-by-side run measured, by text set, then cell name."""

    raw: dict[str, RawResult] = field(default_factory=dict)  # the worker's encoder, replicas
    plain: dict[str, dict[str, LoadReport]] = field(default_factory=dict)
    system: dict[str, dict[str, LoadReport]] = field(default_factory=dict)
    frames: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # process ->
    one_session: dict[str, RawResult] = field(default_factory=dict)  # replicas off
    replicas: int = 1  # single-thread replicas the worker's encoder held for `raw`
    cpu: CpuLedger | None = None  # taskmux under c=64 short texts, the measured cell
    echo_cpu: CpuLedger | None = None  # the same load on a server answering from memory

    def baseline(self, baseline: Baseline) -> dict[str, RawResult]:
        """Raw ONNX Runtime by text set, measured the `baseline` way."""
        return self.one_session if baseline == "one_session" else self.raw

    def reference(self, texts: str, cell: Cell, baseline: Baseline = "replicas") -> float:
        """Raw ONNX Runtime texts/s that `cell` is read against."""
        raw = self.baseline(baseline)[texts]
        return raw.throughput_by_batch[reference_batch(raw, cell)]

    def goals(self, texts: str, baseline: Baseline = "replicas") -> list[Goal]:
        """The goals for one text set, read against `baseline`."""
        c1, c64, many = (self.system[texts][c.name] for c in CELLS)
        p50 = c1.latency_ok.p50_ms or float("inf")
        over = p50 - self.baseline(baseline)[texts].batch1_p50_ms
        loaded = c64.texts_per_s / self.reference(texts, CELLS[1], baseline)
        batched = many.texts_per_s / self.reference(texts, CELLS[2], baseline)
        return [
            Goal("c=64, one text per call / raw best batch", loaded, f">= {THROUGHPUT_GOAL}",
                 loaded >= THROUGHPUT_GOAL),
            Goal("c=1 p50 minus raw batch-1 p50 (ms)", over, f"<= +{LATENCY_GOAL_MS:g}",
                 over <= LATENCY_GOAL_MS),
            Goal(f"c=4, {BATCH_TEXTS} texts per call / raw batch {BATCH_TEXTS}", batched,
                 f">= {BATCH_GOAL}", batched >= BATCH_GOAL),
        ]  # fmt: skip

    def to_dict(self) -> dict[str, object]:
        """JSON-ready figures, for results.json ("raw" and "goals": the replicas baseline)."""
        return {
            "raw": _raw(self.raw),
            "raw_one_session": _raw(self.one_session),
            "encoder_replicas": self.replicas,
            "plain": _reports(self.plain),
            "system": _reports(self.system),
            "goals": {t: {g.name: g.value for g in self.goals(t)} for t in self.system},
            "goals_by_baseline": {
                b: {t: {g.name: g._asdict() for g in self.goals(t, b)} for t in self.system}
                for b in BASELINES
            },
            "profile_top_frames": self.frames,
            "cpu_per_call_c64_short": _ledger(self.cpu),
            "echo_cpu_per_call_c64_short": _ledger(self.echo_cpu),
        }


def _ledger(ledger: CpuLedger | None) -> dict[str, object] | None:
    return None if ledger is None else ledger.__dict__


def reference_batch(raw: RawResult, cell: Cell) -> int:
    """The batch size of raw ONNX Runtime that `cell` is read against."""
    if cell.texts_per_call > 1:
        return cell.texts_per_call
    return 1 if cell.concurrency == 1 else raw.best_batch


def run_peers(repo: Path, out: Path, duration_s: float, warmup_s: float) -> PeerRuns:
    """Raw ONNX Runtime on each text set, then both servers cell by cell, then a profile of
    taskmux's gateway and worker under c=64 short texts (an extra run, not measured), then
    raw again (`keep_better_baselines`)."""
    runs = PeerRuns()
    settings = replace(WorkerSettings.from_env(os.environ), model_repo=repo)
    measure_baselines(runs, settings, duration_s)
    with (
        running_system(repo, out / "system.log") as (target, up),
        plain_server(repo, out / "plain.log") as (plain, _),
    ):
        pids = children(up.pid)
        for name, lengths in TEXT_SETS.items():
            runs.plain[name], runs.system[name] = {}, {}
            for cell in CELLS:
                print(f"bench: side by side, {name} texts, {cell.name}", file=sys.stderr)
                if name == "short" and cell == CELLS[1]:
                    report, runs.cpu = _ledgered_load(target, pids, lengths, duration_s, warmup_s)
                    runs.system[name][cell.name] = report
                else:
                    runs.system[name][cell.name] = _load(
                        target, lengths, cell, duration_s, warmup_s
                    )
                runs.plain[name][cell.name] = _load(plain, lengths, cell, duration_s, warmup_s)
        runs.frames = profile_system(up.pid, target, out, duration_s, warmup_s)
    with plain_server(repo, out / "echo.log", echo=True) as (echo, pid):
        print("bench: a gRPC server answering from memory, short texts, c=64", file=sys.stderr)
        short = TEXT_SETS["short"]
        _, runs.echo_cpu = _ledgered_load(echo, {ECHO: pid}, short, duration_s, warmup_s)
    # Raw again once both servers have stopped, and the better figure of each cell kept: a
    # shared machine drifts over the minutes the side-by-side cells take (raw's best batch
    # read 716 and 784 texts/s in two runs of the same code), and a baseline measured in a
    # slow spell alone would flatter taskmux.
    after = PeerRuns()
    measure_baselines(after, settings, duration_s)
    keep_better_baselines(runs, after)
    return runs


def keep_better_baselines(runs: PeerRuns, other: PeerRuns) -> None:
    """Each raw figure of `runs`, both ways, replaced by `other`'s where that is better."""
    for mine, theirs in ((runs.one_session, other.one_session), (runs.raw, other.raw)):
        for texts, result in theirs.items():
            mine[texts] = best_of([mine[texts], result]) if texts in mine else result


def measure_baselines(runs: PeerRuns, settings: WorkerSettings, duration_s: float) -> None:
    """Raw ONNX Runtime on each text set, both ways, each cell the better of idle threads
    spinning (ONNX Runtime's default) or sleeping (the worker's)."""
    text_sets = {name: _texts(lengths) for name, lengths in TEXT_SETS.items()}
    single = [_encoder(settings, 1, spin) for spin in (True, False)]
    for name, texts in text_sets.items():
        print(f"bench: raw ONNX Runtime, one session, {name} texts", file=sys.stderr)
        results = [measure_raw(e, texts, RAW_BATCHES, duration_s) for e in single]
        runs.one_session[name] = best_of(results)
    del single
    replicated = [_encoder(settings, settings.encoder_replicas, spin) for spin in (True, False)]
    runs.replicas = len(replicated[0].replicas.copies) if replicated[0].replicas else 1
    # Smaller batches run on the same multi-thread session as above, so their figures
    # (batch-1 latency included) are shared rather than measured again. Bigger ones are
    # measured with both spin settings too: with mixed lengths a batch may be cut into
    # chunks under MIN_REPLICA_ROWS, which run on the multi-thread session.
    big = [b for b in RAW_BATCHES if b >= MIN_REPLICA_ROWS]
    for name, texts in text_sets.items():
        one = runs.one_session[name]
        if runs.replicas == 1:
            runs.raw[name] = one
            continue
        print(f"bench: raw ONNX Runtime, {runs.replicas} replicas, {name} texts", file=sys.stderr)
        runs.raw[name] = best_of([
            replace(one, throughput_by_batch=one.throughput_by_batch | measured)
            for measured in (measure_throughput(e, texts, big, duration_s) for e in replicated)
        ])  # fmt: skip
    for encoder in replicated:
        encoder.close()


def _encoder(settings: WorkerSettings, replicas: int, spin: bool) -> Encoder:
    return LoadedModel.load(replace(settings, encoder_replicas=replicas, ort_spin=spin)).encoder


def profile_system(
    up: int, target: str, out: Path, duration_s: float, warmup_s: float
) -> dict[str, list[tuple[str, float]]]:
    """py-spy on the gateway and the worker together under c=64 short texts: the top
    self-time frames of each (raw stacks in out/<process>-profile.txt)."""
    pids = {p: child_pid(up, m) for p, m in (("gateway", "gateway"), ("worker", "workers"))}
    spies = {
        p: (profile(pid, duration_s, out / f"{p}-profile.txt"), out / f"{p}-profile.txt")
        for p, pid in pids.items()
        if pid is not None
    }
    _load(target, TEXT_SETS["short"], CELLS[1], duration_s, warmup_s)
    frames = {}
    for process, (spy, raw) in spies.items():
        spy.wait(duration_s + 30)
        frames[process] = top_frames(raw) if raw.exists() else []
    return frames


@contextmanager
def plain_server(repo: Path, log: Path, *, echo: bool = False) -> Iterator[tuple[str, int]]:
    """bench/plain_server.py in a child process (`--echo`: no encoder); its target and pid
    once it answers an Embed."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.plain_server", "--repo", str(repo), "--port", str(port)]
    with log.open("wb") as err:
        # Fixed argv (this venv's Python), no shell.
        server = subprocess.Popen(argv + ["--echo"] * echo, stdout=err, stderr=err)  # nosec B603
    target = f"127.0.0.1:{port}"
    try:
        _wait_embed(target, server)
        yield target, server.pid
    finally:
        interrupt(server, 30)


def _wait_embed(target: str, server: subprocess.Popen[bytes], attempts: int = 600) -> None:
    with open_channel(target, None, ()) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        for _ in range(attempts):
            if server.poll() is not None:
                raise RuntimeError("the plain server exited before serving; see its log")
            try:
                stub.Embed(pb.EmbedRequest(texts=["warm up"]), timeout=30)
                return
            except grpc.RpcError:
                time.sleep(0.2)
    raise RuntimeError(f"the plain server at {target} is not ready")


def _load(target: str, lengths: str, cell: Cell, duration_s: float, warmup_s: float) -> LoadReport:
    return load(
        target, "embed", cell.concurrency, lengths, duration_s, warmup_s,
        texts_per_request=cell.texts_per_call,
    )  # fmt: skip


def _ledgered_load(
    target: str, pids: dict[str, int], lengths: str, duration_s: float, warmup_s: float
) -> tuple[LoadReport, CpuLedger]:
    """The c=64 cell on `target`, with the CPU each of the server's processes `pids` and
    the load generator spent on it (warm-up included, as its calls are)."""
    before = {p: cpu_seconds(pid) for p, pid in pids.items()}
    mine = _own_cpu_s()
    report = _load(target, lengths, CELLS[1], duration_s, warmup_s)
    spent = {p: cpu_seconds(pid) - before[p] for p, pid in pids.items()}
    spent[LOAD_GENERATOR] = _own_cpu_s() - mine
    calls = max(report.ok + report.errors + report.warmup_calls, 1)
    ledger = CpuLedger(
        {p: 1000 * s / calls for p, s in spent.items()},
        report.ok_per_s,
        len(os.sched_getaffinity(0)),
    )
    return report, ledger


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _texts(lengths: str, n: int = 512) -> list[str]:
    words = [w for w, _ in parse_lengths(lengths)]
    generator = TextGenerator(seed=7)
    return [generator.text(words[i % len(words)]) for i in range(n)]


def _raw(by_set: dict[str, RawResult]) -> dict[str, object]:
    return {t: r.__dict__ | {"best_batch": r.best_batch} for t, r in by_set.items()}


def _reports(by_set: dict[str, dict[str, LoadReport]]) -> dict[str, dict[str, object]]:
    return {t: {c: r.to_dict() for c, r in cells.items()} for t, cells in by_set.items()}


PEERS_HEADING = "## Side by side: raw ONNX Runtime, a plain gRPC server, taskmux"


def peers_lines(runs: PeerRuns, duration_s: float, provenance: str) -> list[str]:
    """The report section for one side-by-side run."""
    lines = [
        PEERS_HEADING,
        "",
        f"Embed through taskmux (`taskmux up` defaults, a fresh idempotency key per call) and "
        f"through a plain grpc.aio server over the same encoder with no queue and no batching "
        f"(bench/plain_server.py), cell by cell one after the other, {duration_s:g} s each; "
        f"raw ONNX Runtime in process on the same texts. Short: {SHORT_WORDS} words (about 16 "
        f"tokens); mixed: {TEXT_SETS['mixed']} words. A ratio is texts/s over raw ONNX "
        f"Runtime's: batch 1 for c=1, its best batch for c=64, batch {BATCH_TEXTS} for "
        f"{BATCH_TEXTS} texts per call. {provenance}",
        "",
        *_baselines_lines(runs.replicas),
        "",
        "| texts | load | raw, one session: texts/s (batch) | raw, replicas: texts/s (batch) "
        "| plain texts/s | ratio: one session / replicas | p50 / p99 ms "
        "| taskmux texts/s | ratio: one session / replicas | p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *_side_by_side_rows(runs),
        "",
        "Raw ONNX Runtime batch-1 p50 (the same multi-thread session both ways): "
        + ", ".join(f"{t} {r.batch1_p50_ms:.2f} ms" for t, r in runs.one_session.items())
        + ".",
        "",
        *_goals_lines(runs),
        *_ledger_lines(runs),
    ]
    for process, frames in runs.frames.items():
        lines += [
            f"Where taskmux's {process} spends its CPU under c=64 short texts (py-spy, self "
            "time, an extra unmeasured run):",
            "",
            "| share of samples | function |",
            "|---|---|",
            *(f"| {share:.1%} | `{frame}` |" for frame, share in frames),
            "",
        ]
    return lines


def _baselines_lines(replicas: int) -> list[str]:
    held = (
        f"here {replicas} single-thread replicas"
        if replicas > 1
        else "which opened no replicas here, so it equals one session"
    )
    return [
        "Raw ONNX Runtime is measured two ways, before the servers start and again after "
        "they stop, each cell the best of both times and of idle threads spinning or "
        "sleeping, and every goal is read against both:",
        "",
        f"- **{BASELINES['one_session']}**: the worker's `Encoder` with replicas off "
        "(`TASKMUX_ENCODER_REPLICAS=1`), one multi-thread session, as issue 15 measured raw "
        "ONNX Runtime and as the obvious in-process code runs it;",
        f"- **{BASELINES['replicas']}**: the worker's default `Encoder`, as taskmux's worker "
        f"runs it ({held}), which runs batches of {MIN_REPLICA_ROWS} or more texts in slices "
        "at once on its replicas; smaller batches, batch 1 included, run on the same "
        "multi-thread session as above, so those figures are shared.",
    ]


def _side_by_side_rows(runs: PeerRuns) -> list[str]:
    rows = []
    for texts in runs.raw:
        for cell in CELLS:
            refs = [runs.reference(texts, cell, b) for b in BASELINES]
            cells = [texts, cell.name]
            cells += [
                f"{ref:.0f} ({reference_batch(runs.baseline(b)[texts], cell)})"
                for ref, b in zip(refs, BASELINES, strict=True)
            ]
            for reports in (runs.plain, runs.system):
                r = reports[texts][cell.name]
                lat = r.latency_ok
                cells += [f"{r.texts_per_s:.0f}",
                          " / ".join(f"{r.texts_per_s / ref:.2f}" for ref in refs),
                          f"{_ms(lat.p50_ms)} / {_ms(lat.p99_ms)}"]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def _goals_lines(runs: PeerRuns) -> list[str]:
    one, strict = BASELINES["one_session"], BASELINES["replicas"]
    lines = [
        f"| texts | goal (issue 15) | target | against {one} | met | against {strict} | met |",
        "|---|---|---|---|---|---|---|",
    ]
    met = dict.fromkeys(BASELINES, 0)
    for texts in runs.system:
        by_baseline = {b: runs.goals(texts, b) for b in BASELINES}
        for row in zip(*by_baseline.values(), strict=True):
            cells = [texts, row[0].name, row[0].target]
            for goal in row:
                cells += [_value(goal.name, goal.value), "yes" if goal.met else "**no**"]
            lines.append("| " + " | ".join(cells) + " |")
        for b, goals in by_baseline.items():
            met[b] += sum(g.met for g in goals)
    total = len(CELLS) * len(runs.system)
    lines += [
        "",
        f"Goals met: {met['one_session']} of {total} against {one}; "
        f"{met['replicas']} of {total} against {strict}.",
        "",
    ]
    return lines


def _ledger_lines(runs: PeerRuns) -> list[str]:
    """Goal 1 as a CPU budget: what all processes may spend per call, against what they
    spent in the measured c=64 short cell."""
    ledger = runs.cpu
    if ledger is None or "short" not in runs.system:
        return []
    spent = ", ".join(f"{p} {ms:.2f} ms" for p, ms in ledger.ms_per_call.items())
    budgets = []
    for b in BASELINES:
        goal_rate = THROUGHPUT_GOAL * runs.reference("short", CELLS[1], b)
        budgets.append(
            f"{ledger.budget_ms(goal_rate):.2f} ms against {b.replace('_', ' ')} "
            f"({THROUGHPUT_GOAL:g} x {goal_rate / THROUGHPUT_GOAL:.0f} = {goal_rate:.0f} calls/s)"
        )
    return [
        "CPU per call under c=64 short texts, in the measured cell (/proc for taskmux's "
        f"processes; the {LOAD_GENERATOR} runs in the bench's own process): {spent}; "
        f"{ledger.total_ms:.2f} ms in all, {ledger.busy_cores:.2f} of {ledger.cores} cores "
        f"busy at {ledger.calls_per_s:.0f} calls/s. Goal 1 leaves every process together "
        f"at most {' and '.join(budgets)} on these {ledger.cores} cores, even with all of "
        "them busy all the time.",
        "",
        *_echo_lines(runs.echo_cpu, ledger),
    ]


def _echo_lines(echo: CpuLedger | None, ledger: CpuLedger) -> list[str]:
    if echo is None:
        return []
    server, generator = echo.ms_per_call[ECHO], echo.ms_per_call[LOAD_GENERATOR]
    gateway = ledger.ms_per_call.get("gateway")
    share = "" if gateway is None else f" (taskmux's gateway: {gateway:.2f} ms)"
    return [
        "The same load on a grpc.aio server that answers Embed from memory, no encoder "
        "(`bench/plain_server.py --echo`, on uvloop as the gateway): the server "
        f"{server:.2f} ms per call{share}, the {LOAD_GENERATOR} {generator:.2f} ms, at "
        f"{echo.calls_per_s:.0f} calls/s: what gRPC alone costs any Python gateway.",
        "",
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _value(goal: str, value: float) -> str:
    return f"{value:+.2f}" if "(ms)" in goal else f"{value:.2f}"
