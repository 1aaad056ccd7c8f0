"""What sealing payloads at rest costs per call: Embed of one short text through two
systems started side by side, payloads plaintext (a) and sealed with a key file (b).

    python -m bench.payload --repo model-repo [--rounds 3 --duration 5]

Each system is its own Valkey, worker and gateway (`taskmux up`), both started together
and left idle while the other is measured. Runs are interleaved in rounds, each round
rotating which goes first, so drift on a shared machine lands on both alike. Every call
carries a fresh idempotency key (the default client's behaviour), so (b) seals the job,
the reply and the stored result, and hashes the request with HMAC: the whole cost.
Prints c=1 latency (p50, p99 over the pooled calls of every round) and the median
throughput at c=64, in texts/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from bench.system import load, running_system, valkey
from router.payload import new_key_line
from taskmux.loadtest.report import LoadReport
from taskmux.loadtest.stats import summarize

WORDS = "6"  # one short text: about 8 tokens
THROUGHPUT_CONCURRENCY = 64
VARIANTS = {"a": "payloads plaintext (baseline)", "b": "payloads sealed (AES-256-GCM)"}


def measure(
    targets: dict[str, str], rounds: int, duration_s: float, warmup_s: float
) -> dict[tuple[str, int], list[LoadReport]]:
    """{(variant, concurrency): one report per round}."""
    runs: dict[tuple[str, int], list[LoadReport]] = {}
    names = list(targets)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for concurrency in (1, THROUGHPUT_CONCURRENCY):
            for name in order:
                print(f"bench: payload {name}, round {r + 1}, c={concurrency}", file=sys.stderr)
                report = load(targets[name], "embed", concurrency, WORDS, duration_s, warmup_s)
                runs.setdefault((name, concurrency), []).append(report)
    return runs


def summary(runs: dict[tuple[str, int], list[LoadReport]], name: str) -> str:
    """One line: the variant's c=1 latency and c=64 throughput."""
    latency_runs = runs[(name, 1)]
    pooled = np.concatenate(
        [r.samples.latency_s[r.samples.ok & r.samples.measured] for r in latency_runs]
    )
    latency, nan = summarize(pooled), float("nan")
    throughput = statistics.median(r.texts_per_s for r in runs[(name, THROUGHPUT_CONCURRENCY)])
    errors = sum(r.errors for c in (1, THROUGHPUT_CONCURRENCY) for r in runs[(name, c)])
    return (
        f"{name}  {VARIANTS[name]:<32} c=1 p50 {latency.p50_ms or nan:.2f} ms  p99 "
        f"{latency.p99_ms or nan:.2f} ms  c={THROUGHPUT_CONCURRENCY} {throughput:.0f} texts/s  "
        f"({len(pooled)} c=1 calls, {errors} errors)"
    )


def main(argv: list[str] | None = None) -> int:
    """Start both systems, measure them interleaved, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path("model-repo"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="taskmux-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        key_file = work / "payload.keys"
        key_file.write_text(new_key_line("bench") + "\n")
        targets = {}
        for name in VARIANTS:
            url = stack.enter_context(valkey(work / f"valkey-{name}"))
            env = {"TASKMUX_REDIS_URL": url}
            if name == "b":
                env["TASKMUX_PAYLOAD_KEY_FILE"] = str(key_file)
            target, _ = stack.enter_context(
                running_system(args.repo, work / f"payload-{name}.log", env=env)
            )
            targets[name] = target
        runs = measure(targets, args.rounds, args.duration, args.warmup)
    for name in VARIANTS:
        print(summary(runs, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
