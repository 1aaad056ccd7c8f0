"""Interleaved A/B of two source trees: is a change to the hot path worth keeping?

Both systems (Valkey, gateway, worker, each tree's own code) run at once; every round
measures each cell on A and on B one right after the other, the order flipping from
round to round, so that drift on a shared machine (other jobs, thermal) falls on both.
What counts is the median over rounds of B's figure against A's in the same round.

    git archive HEAD | tar -x -C /tmp/base     # A: the last commit
    python -m bench.ab --a /tmp/base --rounds 5 --duration 6

B defaults to this tree. Timing never decides a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from bench.peers import SHORT_WORDS
from bench.system import load, running_system

# name: (concurrency, texts per call, words per text)
CELLS = {
    "c64": (64, 1, str(SHORT_WORDS)),
    "c1": (1, 1, str(SHORT_WORDS)),
    "c4x32": (4, 32, str(SHORT_WORDS)),
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
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args(argv)
    cells = args.cells.split(",")
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with ExitStack() as stack:
        targets = {}
        for name, tree in (("A", args.a), ("B", args.b)):
            tree = tree.resolve()
            env = {"PYTHONPATH": os.pathsep.join([str(tree), str(tree / "client")])}
            log = args.log_dir / f"ab-{name}.log"
            target, _ = stack.enter_context(
                running_system(args.repo.resolve(), log, env=env, cwd=tree)
            )
            targets[name] = target
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for cell in cells:
                concurrency, per_call, words = CELLS[cell]
                for name in order:
                    report = load(
                        targets[name], "embed", concurrency, words, args.duration,
                        args.warmup, texts_per_request=per_call,
                    )  # fmt: skip
                    p50 = report.latency_ok.p50_ms or float("nan")
                    figures.setdefault((cell, name), []).append((report.texts_per_s, p50))
                    print(f"round {r} {cell} {name}: {report.texts_per_s:.0f} texts/s, "
                          f"p50 {p50:.2f} ms, errors {report.errors}", file=sys.stderr)  # fmt: skip
    for cell in cells:
        a, b = figures[(cell, "A")], figures[(cell, "B")]
        ratios = [fb[0] / fa[0] for fa, fb in zip(a, b, strict=True)]
        deltas = [fb[1] - fa[1] for fa, fb in zip(a, b, strict=True)]
        print(
            f"{cell}: B/A texts/s median {statistics.median(ratios):.3f} "
            f"({', '.join(f'{x:.2f}' for x in ratios)}); B-A p50 median "
            f"{statistics.median(deltas):+.2f} ms ({', '.join(f'{x:+.2f}' for x in deltas)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
