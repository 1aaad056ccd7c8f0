"""Side by side in one run: raw ONNX Runtime, a plain gRPC server, and taskmux.

The plain server (bench/plain_server.py) is what serving the encoder costs without a
queue or batching; taskmux (`taskmux up` defaults) is measured in the same run, cell by
cell, one right after the other, so that drift on a shared machine falls on both. Short
texts (SHORT_WORDS words, about 16 tokens) and mixed lengths are reported apart: with
short texts the encoder is cheap and the work around it dominates.

Cells: one text per call at c=1 (latency) and at c=64 (throughput under load), and 32
texts per call at c=4 (batch RPCs). Each is read against raw ONNX Runtime on the same
texts: c=1 against batch 1, c=64 against its best batch, 32 texts against batch 32.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client.channel import open_channel

from bench.raw import RawResult, best_of, measure_raw
from bench.system import child_pid, interrupt, load, profile, running_system, top_frames
from model.loaded import LoadedModel
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


@dataclass(frozen=True)
class Cell:
    """One load: callers, and texts per call."""

    name: str
    concurrency: int
    texts_per_call: int


CELLS = (Cell("c=1", 1, 1), Cell("c=64", 64, 1), Cell(f"c=4 x{BATCH_TEXTS}", 4, BATCH_TEXTS))


@dataclass
class PeerRuns:
    """Everything one side-by-side run measured, by text set, then cell name."""

    raw: dict[str, RawResult] = field(default_factory=dict)
    plain: dict[str, dict[str, LoadReport]] = field(default_factory=dict)
    system: dict[str, dict[str, LoadReport]] = field(default_factory=dict)
    frames: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # process ->

    def reference(self, texts: str, cell: Cell) -> float:
        """Raw ONNX Runtime texts/s that `cell` is read against."""
        raw = self.raw[texts]
        if cell.texts_per_call > 1:
            return raw.throughput_by_batch[cell.texts_per_call]
        return raw.throughput_by_batch[1] if cell.concurrency == 1 else raw.best_throughput

    def goals(self, texts: str) -> list[tuple[str, float, str, bool]]:
        """(goal, value, target, met) for one text set."""
        c1, c64, many = (self.system[texts][c.name] for c in CELLS)
        p50 = c1.latency_ok.p50_ms or float("inf")
        over = p50 - self.raw[texts].batch1_p50_ms
        loaded = c64.texts_per_s / self.reference(texts, CELLS[1])
        batched = many.texts_per_s / self.reference(texts, CELLS[2])
        return [
            ("c=64, one text per call / raw best batch", loaded, f">= {THROUGHPUT_GOAL}",
             loaded >= THROUGHPUT_GOAL),
            ("c=1 p50 minus raw batch-1 p50 (ms)", over, f"<= +{LATENCY_GOAL_MS:g}",
             over <= LATENCY_GOAL_MS),
            (f"c=4, {BATCH_TEXTS} texts per call / raw batch {BATCH_TEXTS}", batched,
             f">= {BATCH_GOAL}", batched >= BATCH_GOAL),
        ]  # fmt: skip

    def to_dict(self) -> dict[str, object]:
        """JSON-ready figures, for results.json."""
        return {
            "raw": {t: r.__dict__ | {"best_batch": r.best_batch} for t, r in self.raw.items()},
            "plain": _reports(self.plain),
            "system": _reports(self.system),
            "goals": {t: {g: v for g, v, _, _ in self.goals(t)} for t in self.system},
            "profile_top_frames": self.frames,
        }


def run_peers(repo: Path, out: Path, duration_s: float, warmup_s: float) -> PeerRuns:
    """Raw ONNX Runtime on each text set, then both servers cell by cell, then a profile of
    taskmux's gateway and worker under c=64 short texts (an extra run, not measured)."""
    runs = PeerRuns()
    settings = replace(WorkerSettings.from_env(os.environ), model_repo=repo)
    # ONNX Runtime's default (idle threads spin) and the worker's (they sleep).
    encoders = [LoadedModel.load(replace(settings, ort_spin=s)).encoder for s in (True, False)]
    for name, lengths in TEXT_SETS.items():
        print(f"bench: raw ONNX Runtime, {name} texts", file=sys.stderr)
        texts = _texts(lengths)
        runs.raw[name] = best_of([measure_raw(e, texts, RAW_BATCHES, duration_s) for e in encoders])
    del encoders
    with (
        running_system(repo, out / "system.log") as (target, up),
        plain_server(repo, out / "plain.log") as plain,
    ):
        for name, lengths in TEXT_SETS.items():
            runs.plain[name], runs.system[name] = {}, {}
            for cell in CELLS:
                print(f"bench: side by side, {name} texts, {cell.name}", file=sys.stderr)
                for server, reports in ((target, runs.system), (plain, runs.plain)):
                    reports[name][cell.name] = _load(server, lengths, cell, duration_s, warmup_s)
        runs.frames = profile_system(up.pid, target, out, duration_s, warmup_s)
    return runs


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
def plain_server(repo: Path, log: Path) -> Iterator[str]:
    """bench/plain_server.py in a child process; its target once it answers an Embed."""
    port = free_port()
    with log.open("wb") as err:
        # Fixed argv (this venv's Python), no shell.
        server = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "bench.plain_server", "--repo", str(repo), "--port", str(port)],
            stdout=err,
            stderr=err,
        )
    target = f"127.0.0.1:{port}"
    try:
        _wait_embed(target, server)
        yield target
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


def _texts(lengths: str, n: int = 512) -> list[str]:
    words = [w for w, _ in parse_lengths(lengths)]
    generator = TextGenerator(seed=7)
    return [generator.text(words[i % len(words)]) for i in range(n)]


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
        "| texts | load | raw texts/s (batch) | plain texts/s | ratio | p50 / p99 ms "
        "| taskmux texts/s | ratio | p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for texts, raw in runs.raw.items():
        for cell in CELLS:
            ref = runs.reference(texts, cell)
            batch = cell.texts_per_call if cell.texts_per_call > 1 else raw.best_batch
            batch = 1 if cell.concurrency == 1 else batch
            cells = [texts, cell.name, f"{ref:.0f} ({batch})"]
            for reports in (runs.plain, runs.system):
                r = reports[texts][cell.name]
                lat = r.latency_ok
                cells += [f"{r.texts_per_s:.0f}", f"{r.texts_per_s / ref:.2f}",
                          f"{_ms(lat.p50_ms)} / {_ms(lat.p99_ms)}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Raw ONNX Runtime batch-1 p50: "
        + ", ".join(f"{t} {r.batch1_p50_ms:.2f} ms" for t, r in runs.raw.items())
        + ".",
        "",
        "| texts | goal (issue 15) | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for texts in runs.system:
        lines += [
            f"| {texts} | {goal} | {_value(goal, value)} | {target} "
            f"| {'yes' if met else '**no**'} |"
            for goal, value, target, met in runs.goals(texts)
        ]
    lines.append("")
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


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _value(goal: str, value: float) -> str:
    return f"{value:+.2f}" if "(ms)" in goal else f"{value:.2f}"
