"""Interleaved A/B of two source trees: is a change to the hot path worth keeping?

Both systems (Valkey, gateway, worker, each tree's own code) run at once; every round
measures each cell on A and on B one right after the other, the order flipping from
round to round, so that drift on a shared machine (other jobs, thermal) falls on both.
What counts is the median over rounds of B's figure against A's in the same round: texts/s,
p50, and the CPU time per call that the system's processes (gateway, worker, Valkey)
spent, read from /proc, which drifts far less than throughput when other jobs compete
for the cores.

    git archive HEAD | tar -x -C /tmp/base     # A: the last commit
    python -m bench.ab --a /tmp/base --rounds 5 --duration 6

B defaults to this tree. Timing never decides a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.peers import SHORT_WORDS
from bench.system import children, cpu_seconds, load, running_system

# name: (concurrency, texts per call, words per text)
CELLS = {
    "c64": (64, 1, str(SHORT_WORDS)),
    "c1": (1, 1, str(SHORT_WORDS)),
    "c4x32": (4, 32, str(SHORT_WORDS)),
    "c64mixed": (64, 1, "6,24,96"),
    "c1mixed": (1, 1, "6,24,96"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m bench.ab --a DIR [--b DIR]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--a", type=Path, required=True, help="source tree of A (baseline)")
    parser.add_argument("--b", type=Path, default=Path.cwd(), help="source tree of B")
    parser.add_argument("--repo", type=Path, default=Path("model-repo"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--cells", default="c64,c1", help=f"of {', '.join(CELLS)}")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    cells = args.cells.split(",")
    samples: dict[tuple[str, str], list[Sample]] = {}
    with ExitStack() as stack:
        targets, pids = {}, {}
        for name, tree in (("A", args.a), ("B", args.b)):
            tree = tree.resolve()
            env = {"PYTHONPATH": os.pathsep.join([str(tree), str(tree / "client")])}
            log = args.log_dir / f"ab-{name}.log"
            target, up = stack.enter_context(
                running_system(args.repo.resolve(), log, env=env, cwd=tree)
            )
            targets[name], pids[name] = target, children(up.pid)
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for cell in cells:
                for name in order:
                    sample = measure(targets[name], pids[name], CELLS[cell], args)
                    samples.setdefault((cell, name), []).append(sample)
                    print(f"round {r} {cell} {name}: {sample}", file=sys.stderr)
    for cell in cells:
        print(summary(cell, samples[(cell, "A")], samples[(cell, "B")]))
    return 0


@dataclass(frozen=True)
class Sample:
    """One load on one system: throughput, median latency, CPU ms per call by process."""

    texts_per_s: float
    p50_ms: float
    cpu_ms: dict[str, float]

    def __str__(self) -> str:
        cpu = ", ".join(f"{p} {ms:.2f}" for p, ms in self.cpu_ms.items())
        return f"{self.texts_per_s:.0f} texts/s, p50 {self.p50_ms:.2f} ms, CPU ms/call: {cpu}"


def measure(
    target: str, pids: dict[str, int], cell: tuple[int, int, str], args: argparse.Namespace
) -> Sample:
    """One closed-loop load, with the CPU time each process spent on it."""
    concurrency, per_call, words = cell
    before = {p: cpu_seconds(pid) for p, pid in pids.items()}
    report = load(
        target, "embed", concurrency, words, args.duration, args.warmup,
        texts_per_request=per_call,
    )  # fmt: skip
    calls = max(report.ok + report.errors + report.warmup_calls, 1)
    cpu_ms = {p: 1000 * (cpu_seconds(pid) - before[p]) / calls for p, pid in pids.items()}
    cpu_ms["all"] = sum(cpu_ms.values())
    return Sample(report.texts_per_s, report.latency_ok.p50_ms or float("nan"), cpu_ms)


def summary(cell: str, a: list[Sample], b: list[Sample]) -> str:
    """Medians over rounds of B against A in the same round."""
    pairs = list(zip(a, b, strict=True))
    lines = [
        f"{cell}: B/A texts/s {_median([y.texts_per_s / x.texts_per_s for x, y in pairs])}",
        f"{cell}: B-A p50 ms {_median([y.p50_ms - x.p50_ms for x, y in pairs], sign=True)}",
    ]
    for process in a[0].cpu_ms:
        ratios = [y.cpu_ms[process] / x.cpu_ms[process] for x, y in pairs if x.cpu_ms[process]]
        base = statistics.median(x.cpu_ms[process] for x in a)
        lines.append(f"{cell}: B/A CPU/call {process} (A {base:.2f} ms) {_median(ratios)}")
    return "\n".join(lines)


def _median(values: list[float], *, sign: bool = False) -> str:
    if not values:
        return "-"
    fmt = "{:+.2f}" if sign else "{:.3f}"
    each = ", ".join(fmt.format(v) for v in values)
    return f"median {fmt.format(statistics.median(values))} ({each})"


if __name__ == "__main__":
    sys.exit(main())
