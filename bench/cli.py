"""Labelling a file with the CLI against the load tester, on the same system.

    python -m bench.cli --repo model-repo                 # starts a system as `make run` does
    python -m bench.cli --target 127.0.0.1:50051          # or uses one already running

Writes a file of `--lines` texts (50,000; English-like, from the load tester's generator
and word lengths), runs `taskmux classify --input FILE --head sentiment` on it as a user
would (a process of its own, JSONL to a file, wall clock from start to exit), then
`taskmux loadtest` with the same head, texts per request and calls in flight. It prints
both texts/s side by side. The CLI's figure includes its start-up, reading the file and
writing every result; the load tester's is a measured window after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.system import running_system
from taskmux.loadtest.config import LoadConfig, parse_lengths, parse_mix
from taskmux.loadtest.runner import run_load
from taskmux.loadtest.texts import TextGenerator


def write_texts(path: Path, lines: int, lengths: str, seed: int = 0) -> None:
    """`lines` texts, one a line, their word counts drawn as the load tester draws them."""
    words, weights = zip(*parse_lengths(lengths), strict=True)
    generator = TextGenerator(seed)
    pick = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(lines):
            out.write(generator.text(pick.choices(words, weights)[0]) + "\n")


def run_cli(target: str, path: Path, args: argparse.Namespace, out: Path) -> dict[str, object]:
    """`taskmux classify --input` as a user runs it; its texts/s, wall clock to exit."""
    argv = [
        *(sys.executable, "-m", "taskmux.cli", "classify", "--head", args.head),
        *("--input", str(path), "--target", target),
        *("--batch-size", str(args.batch_size), "--concurrency", str(args.concurrency)),
    ]
    started = time.perf_counter()
    with out.open("wb") as stdout:
        # Fixed argv (this venv's taskmux), no shell.
        done = subprocess.run(argv, stdout=stdout, check=False)  # nosec B603
    elapsed_s = time.perf_counter() - started
    with out.open(encoding="utf-8") as lines:
        results = sum(1 for _ in lines)
    if done.returncode != 0 or results != args.lines:
        raise SystemExit(f"the CLI exited {done.returncode} after {results} of {args.lines}")
    return {
        "command": " ".join(["taskmux", *argv[3:]]),
        "texts": results,
        "seconds": round(elapsed_s, 2),
        "texts_per_s": round(results / elapsed_s, 1),
    }


def run_loadtest(target: str, args: argparse.Namespace) -> dict[str, object]:
    """`taskmux loadtest` with the CLI's head, texts per request and calls in flight."""
    config = LoadConfig(
        target=target,
        mode="closed",
        concurrency=args.concurrency,
        duration_s=args.loadtest_s,
        warmup_s=2.0,
        mix=parse_mix(f"classify:{args.head}"),
        lengths=parse_lengths(args.lengths),
        texts_per_request=args.batch_size,
        connections=1,  # the CLI's one channel
    )
    report = asyncio.run(run_load(config))
    if report.errors:
        raise SystemExit(f"the load test had errors: {report.errors}")
    return {
        "command": (
            f"taskmux loadtest --mix classify:{args.head} --texts {args.batch_size} "
            f"--concurrency {args.concurrency} --connections 1 --lengths {args.lengths} "
            f"--duration {args.loadtest_s:g} --warmup 2"
        ),
        "texts_per_s": round(report.texts_per_s, 1),
    }


@contextmanager
def system(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    """The target: the one named, else a system started as `make run` starts one."""
    if args.target:
        yield args.target
        return
    with running_system(args.repo, workdir / "system.log") as (target, _):
        yield target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli", description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path("model-repo"))
    parser.add_argument("--target", help="a running system (default: start one)")
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--lengths", default="8,16,32", help="words per text, as loadtest")
    parser.add_argument("--head", default="sentiment")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--loadtest-s", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp, system(args, Path(tmp)) as target:
        texts = Path(tmp) / "texts.txt"
        write_texts(texts, args.lines, args.lengths)
        cli = run_cli(target, texts, args, Path(tmp) / "labels.jsonl")
        loadtest = run_loadtest(target, args)
    print(f"{'':10}{'texts/s':>10}  command")
    print(f"{'CLI':10}{cli['texts_per_s']:>10}  {cli['command']} ({cli['seconds']} s)")
    print(f"{'loadtest':10}{loadtest['texts_per_s']:>10}  {loadtest['command']}")
    if args.json:
        args.json.write_text(json.dumps({"cli": cli, "loadtest": loadtest}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
