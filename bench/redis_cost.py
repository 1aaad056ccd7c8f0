"""What one call costs Valkey: commands and CPU time per 1-text Embed
(`python -m bench.redis_cost`; `--help` for the knobs).

Valkey, one worker and one gateway with default settings (`taskmux up`, Valkey with AOF
as `redis.yaml` runs it), driven by the default Python client. For each concurrency it
runs `--calls` keyed calls (an idempotency key on each, as the default client sends) and
as many unkeyed ones, each window after `CONFIG RESETSTAT`, and reads Valkey's
`INFO cpu commandstats stats` before and after:

  commands   per call, by command, as `commandstats` counts them: the commands a Lua
             script runs (`redis.call`) and those a MULTI queues are counted under their
             own names as well, so EVALSHA's XLEN and XADD appear again as XLEN and XADD;
  reads      per call, `total_reads_processed`: socket reads, so about the round trips
             clients made (a pipeline or a MULTI sent at once is one);
  CPU        per call, Valkey's used_cpu_sys + used_cpu_user (whole process: the main
             thread, which runs every command, and the AOF's background threads); one
             core sustains about 1 / that calls/s at 100%, an estimate: at higher load
             reads and transactions carry more jobs each, so the cost per call falls.
             `used_active_time_main_thread` (Valkey 9.1) is reported too, but it is
             wall time: on a machine that Valkey shares with the load it counts the
             time the thread was preempted, and reads above the CPU time.

What gateways and workers send while idle (registry, catalog, memory guard, blocked reads
timing out, counters) is measured in a window without calls and subtracted, per second,
from each window: it grows with processes and time, not with calls, and is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import redis
from taskmux_client import AsyncTaskMuxClient, Attempt

from bench.system import running_system, valkey
from taskmux.loadtest.texts import TextGenerator

CALLS = 300  # per window (keyed, unkeyed) and concurrency
CONCURRENCY = (1, 16, 64)
IDLE_S = 3.0
WORDS_PER_TEXT = 8
# Each window's own commands: CONFIG RESETSTAT, then the INFO of its first snapshot.
OWN_COMMANDS = {"config|resetstat": 1, "info": 1}


# Seconds after a window's last answer before its closing snapshot.
SETTLE_S = 0.2


@dataclass(frozen=True)
class Snapshot:
    """Valkey's counters at one moment."""

    at_s: float
    cpu_s: float  # used_cpu_sys + used_cpu_user
    active_s: float  # used_active_time_main_thread
    reads: int  # total_reads_processed
    commands: dict[str, int]  # commandstats calls, by command


def snapshot(r: redis.Redis) -> Snapshot:
    """One INFO of the sections the bench reads."""
    info = r.info("cpu", "commandstats", "stats")
    return Snapshot(
        at_s=time.monotonic(),
        cpu_s=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        active_s=float(info["used_active_time_main_thread"]),
        reads=int(info["total_reads_processed"]),
        commands={
            name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in info.items()
            if name.startswith("cmdstat_")
        },
    )


@dataclass(frozen=True)
class Window:
    """What Valkey did between two snapshots, less the window's own commands."""

    seconds: float
    cpu_s: float
    active_s: float
    reads: int
    commands: dict[str, int]

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot) -> Window:
        commands = Counter(b.commands)
        commands.subtract(a.commands)  # zero after RESETSTAT; the counts since otherwise
        commands.subtract(OWN_COMMANDS)
        return cls(
            seconds=b.at_s - a.at_s,
            cpu_s=b.cpu_s - a.cpu_s,
            active_s=b.active_s - a.active_s,
            reads=b.reads - a.reads - 1,  # the first snapshot's INFO
            commands={k: v for k, v in commands.items() if v > 0},
        )


@dataclass(frozen=True)
class Cost:
    """One window of calls, per call, with the idle background subtracted."""

    keyed: bool
    concurrency: int
    calls: int
    failed_attempts: int
    seconds: float
    calls_per_s: float  # what this shared machine did: not a Valkey limit
    commands_per_call: float
    reads_per_call: float  # about the round trips to Valkey
    by_command: dict[str, float]
    cpu_us_per_call: float
    active_us_per_call: float  # wall time: inflated where Valkey shares its cores
    calls_per_core_s: float  # 1 / cpu_us_per_call: the estimate

    @classmethod
    def of(cls, keyed: bool, concurrency: int, calls: Calls, w: Window, idle: Window) -> Cost:
        n = calls.ok

        def per_call(value: float, idle_value: float) -> float:
            return max(value - idle_value * w.seconds / idle.seconds, 0.0) / n

        by_command = {
            name: per_call(count, idle.commands.get(name, 0))
            for name, count in sorted(w.commands.items())
        }
        cpu = per_call(w.cpu_s, idle.cpu_s)
        active = per_call(w.active_s, idle.active_s)
        return cls(
            keyed=keyed,
            concurrency=concurrency,
            calls=n,
            failed_attempts=calls.failed,
            seconds=w.seconds,
            calls_per_s=n / w.seconds,
            commands_per_call=sum(by_command.values()),
            reads_per_call=per_call(w.reads, idle.reads),
            by_command={k: v for k, v in by_command.items() if v >= 0.005},
            cpu_us_per_call=cpu * 1e6,
            active_us_per_call=active * 1e6,
            calls_per_core_s=1 / cpu if cpu > 0 else 0.0,
        )


@dataclass(frozen=True)
class Background:
    """What the idle system sends Valkey, per second."""

    seconds: float
    commands_per_s: float
    by_command: dict[str, float]
    cpu_ms_per_s: float
    active_ms_per_s: float

    @classmethod
    def of(cls, w: Window) -> Background:
        return cls(
            seconds=w.seconds,
            commands_per_s=sum(w.commands.values()) / w.seconds,
            by_command={k: v / w.seconds for k, v in sorted(w.commands.items())},
            cpu_ms_per_s=w.cpu_s / w.seconds * 1000,
            active_ms_per_s=w.active_s / w.seconds * 1000,
        )


@dataclass(frozen=True)
class RedisCost:
    """One run: when, where, the background, and each window."""

    when: str
    nproc: int
    valkey_version: str
    idle: Background
    costs: list[Cost]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Calls:
    """Calls answered and attempts that failed (each one's commands count too)."""

    ok: int = 0
    failed: int = 0

    def on_attempt(self, attempt: Attempt) -> None:
        if attempt.code != grpc.StatusCode.OK:
            self.failed += 1


async def drive(target: str, *, calls: int, concurrency: int, keyed: bool) -> Calls:
    """`calls` 1-text Embeds from `concurrency` callers back to back through one client."""
    texts = TextGenerator(seed=12)
    seen = Calls()
    left = calls
    async with AsyncTaskMuxClient(
        target, auto_idempotency_key=keyed, on_attempt=seen.on_attempt
    ) as client:

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await client.embed([texts.text(WORDS_PER_TEXT)])  # an error ends the bench
                seen.ok += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return seen


def measure(
    target: str, url: str, *, calls: int, concurrency: Sequence[int], idle_s: float
) -> RedisCost:
    """Warm up, measure the idle background, then each (concurrency, keyed) window."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with redis.Redis.from_url(url) as r:
        for keyed in (True, False):  # every script loaded, every connection open
            asyncio.run(drive(target, calls=4, concurrency=2, keyed=keyed))

        r.config_resetstat()
        before = snapshot(r)
        time.sleep(idle_s)
        idle = Window.between(before, snapshot(r))
        costs = []
        for c in concurrency:
            for keyed in (True, False):
                r.config_resetstat()
                before = snapshot(r)
                seen = asyncio.run(drive(target, calls=calls, concurrency=c, keyed=keyed))
                # A keyed call's result is stored just after it answers: let those land.
                time.sleep(SETTLE_S)
                costs.append(Cost.of(keyed, c, seen, Window.between(before, snapshot(r)), idle))
        version = str(r.info("server").get("valkey_version") or r.info("server")["redis_version"])
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return RedisCost(when, nproc or 0, version, Background.of(idle), costs)


@contextmanager
def system(repo: Path, log: Path) -> Iterator[tuple[str, str]]:
    """(target, Redis URL) of Valkey (AOF on), one worker and one gateway."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="taskmux-cost-")))
        url = stack.enter_context(valkey(tmp / "valkey"))
        target, _ = stack.enter_context(
            running_system(repo, log, env={"TASKMUX_REDIS_URL": url}, workers=1)
        )
        yield target, url


def table(run: RedisCost) -> list[str]:
    """The run as markdown: one column per window, one row per figure or command."""
    names = sorted({n for c in run.costs for n in c.by_command})
    head = [f"{'keyed' if c.keyed else 'unkeyed'}, c={c.concurrency}" for c in run.costs]

    def row(label: str, cell: Callable[[Cost], str]) -> str:
        return f"| {label} | " + " | ".join(cell(c) for c in run.costs) + " |"

    rows = [
        row("calls (failed attempts)", lambda c: f"{c.calls} ({c.failed_attempts})"),
        row("calls/s here (one worker: not a Valkey limit)", lambda c: f"{c.calls_per_s:.0f}"),
        row("**commands per call**", lambda c: f"**{c.commands_per_call:.2f}**"),
        *(row(f"`{n.upper()}`", _command_cell(n)) for n in names),
        row("socket reads per call (about round trips)", lambda c: f"{c.reads_per_call:.2f}"),
        row("**Valkey CPU per call (µs)**", lambda c: f"**{c.cpu_us_per_call:.0f}**"),
        row(
            "**calls/s one Valkey core sustains (est.)**",
            lambda c: f"**{c.calls_per_core_s:,.0f}**",
        ),
        row(
            "main thread active, wall (µs; preempted here)", lambda c: f"{c.active_us_per_call:.0f}"
        ),
    ]
    lines = [
        f"Valkey {run.valkey_version}, {run.when}, nproc {run.nproc} (shared machine)",
        "",
        "| per 1-text Embed | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
        *rows,
        "",
        f"Idle background, subtracted above ({run.idle.seconds:.1f} s, one gateway and one "
        f"worker): {run.idle.commands_per_s:.1f} commands/s, {run.idle.cpu_ms_per_s:.2f} ms "
        f"CPU/s ({run.idle.active_ms_per_s:.2f} ms active); "
        + ", ".join(f"{k.upper()} {v:.1f}/s" for k, v in run.idle.by_command.items()),
    ]
    return lines


def _command_cell(name: str) -> Callable[[Cost], str]:
    return lambda c: f"{c.by_command.get(name, 0):.2f}"


def _concurrency(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cost", description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path("model-repo"), help="model repository")
    parser.add_argument("--calls", type=int, default=CALLS, help="per window (default %(default)s)")
    parser.add_argument(
        "--concurrency",
        type=_concurrency,
        default=CONCURRENCY,
        help="comma-separated callers per window (default 1,16,64)",
    )
    parser.add_argument("--idle-s", type=float, default=IDLE_S, help="the background window (s)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--log", type=Path, help="the processes' log (default: a temp file)")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        log = args.log or Path(stack.enter_context(tempfile.TemporaryDirectory())) / "up.log"
        with system(args.repo, log) as (target, url):
            run = measure(
                target, url, calls=args.calls, concurrency=args.concurrency, idle_s=args.idle_s
            )
    print("\n".join(table(run)))
    if args.out:
        args.out.write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
