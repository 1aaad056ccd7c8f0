"""`taskmux loadtest`: the command-line face of run_load."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskmux.clientargs import ClientOptionsError, add_client_arguments, security_from_args
from taskmux.loadtest.config import (
    DEFAULT_LENGTHS,
    DEFAULT_MIX,
    ConfigError,
    LoadConfig,
    Mode,
    parse_lengths,
    parse_mix,
)

if TYPE_CHECKING:
    from taskmux.loadtest.progress import Progress
    from taskmux.loadtest.report import LoadReport

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_DURATION_S = 10.0

EPILOG = """\
mix (--mix): comma-separated TASK[:ARG][=WEIGHT]; weight defaults to 1
  embed                   Embed
  classify:HEAD           Classify with HEAD, e.g. classify:sentiment
  entities[:HEAD]         ExtractEntities (HEAD defaults to entities)
  similarity[:N]          Similarity, one query and N candidates (default 8)
  zero-shot[:L1+L2+...]   ZeroShotClassify with these labels (default 4 topics)
  analyze:H1+H2+...       Analyze (server stream), e.g. analyze:embed+sentiment+topic
lengths (--lengths): comma-separated WORDS[=WEIGHT], e.g. 8,32=2,128

examples:
  taskmux loadtest --concurrency 16 --duration 30
  taskmux loadtest --rate 200 --duration 60 --connections 8 \\
      --mix embed=2,classify:sentiment=1,analyze:embed+sentiment+topic+intent=1,entities=1
  taskmux loadtest --requests 1000 --json report.json --plot report.png
  TASKMUX_API_KEY=... taskmux loadtest --target gw:443 --tls --ca-file ca.pem

exit status: 0 every measured call succeeded; 1 some failed or were dropped; 2 bad options
"""


def add_loadtest_command(sub: Any) -> None:
    """Register `taskmux loadtest` on the CLI's subparsers."""
    help_text = "Drive a deployment with load over gRPC and report throughput and latency"
    p = sub.add_parser(
        "loadtest",
        help=help_text,
        description=help_text,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default=os.environ.get("TASKMUX_TARGET", DEFAULT_TARGET))
    p.add_argument("--mode", choices=("closed", "open"), help="default: open if --rate is set")
    p.add_argument(
        "--concurrency", type=int, default=8, metavar="N", help="closed loop callers (8)"
    )
    p.add_argument("--rate", type=float, metavar="R", help="open loop: mean requests/s")
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help=f"measured seconds after the warm-up ({DEFAULT_DURATION_S:g} without --requests)",
    )
    p.add_argument("--requests", type=int, metavar="N", help="measured requests to send")
    p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="left out (1)")
    p.add_argument("--mix", type=_spec(parse_mix), default=DEFAULT_MIX, help="see below")
    p.add_argument(
        "--lengths", type=_spec(parse_lengths), default=DEFAULT_LENGTHS, help="words per text"
    )
    p.add_argument("--texts", type=int, default=1, metavar="N", help="texts per request (1)")
    p.add_argument("--connections", type=int, default=4, metavar="K", help="channels (4)")
    p.add_argument("--deadline", type=float, default=10.0, metavar="S", help="per call (10)")
    p.add_argument(
        "--max-outstanding", type=int, default=1024, metavar="N", help="open loop cap (1024)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--idempotency-keys",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a fresh idempotency key per call, as the Python client sends (on)",
    )
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': stdout)")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of the run")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_client_arguments(p)
    p.set_defaults(func=run_command)


def _spec(parse: Any) -> Any:
    def parse_arg(text: str) -> object:
        try:
            return parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse_arg


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The LoadConfig that the parsed options describe; raises ConfigError."""
    try:
        security = security_from_args(args)
    except ClientOptionsError as err:
        raise ConfigError(str(err)) from None
    mode: Mode = args.mode or ("open" if args.rate is not None else "closed")
    if mode == "closed" and args.rate is not None:
        raise ConfigError("--rate is for the open loop; drop it or use --mode open")
    mix = parse_mix(args.mix) if isinstance(args.mix, str) else args.mix
    lengths = parse_lengths(args.lengths) if isinstance(args.lengths, str) else args.lengths
    duration = args.duration
    if duration is None and args.requests is None:
        duration = DEFAULT_DURATION_S
    return LoadConfig(
        target=args.target,
        mode=mode,
        concurrency=args.concurrency,
        rate=args.rate or 0.0,
        duration_s=duration,
        warmup_s=args.warmup,
        requests=args.requests,
        mix=mix,
        lengths=lengths,
        texts_per_request=args.texts,
        connections=args.connections,
        deadline_s=args.deadline,
        max_outstanding=args.max_outstanding,
        seed=args.seed,
        idempotency_keys=args.idempotency_keys,
        tls=security.tls,
        api_key=security.api_key,
    )


def run_command(args: argparse.Namespace) -> int:
    """Run the load test the options describe; print and write the report."""
    try:
        config = config_from_args(args)
    except ConfigError as err:
        print(f"taskmux loadtest: {err}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before the run, not after it
        except ImportError:
            print(
                "taskmux loadtest: --plot needs matplotlib (pip install matplotlib)",
                file=sys.stderr,
            )
            return 2
    from taskmux.loadtest.progress import Progress
    from taskmux.loadtest.report import format_text

    progress = None if args.quiet else Progress(config, sys.stderr)
    try:
        report = asyncio.run(_run(config, progress))
    finally:
        if progress is not None:
            progress.close()
    summary_out = sys.stderr if args.json == "-" else sys.stdout
    print(format_text(report), file=summary_out)
    if args.json:
        text = json.dumps(report.to_dict(), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    if args.plot:
        from taskmux.loadtest.plot import save_plot

        save_plot(report, args.plot)
    return 0 if report.errors == 0 and report.dropped == 0 else 1


async def _run(config: LoadConfig, progress: Progress | None) -> LoadReport:
    """run_load, with a first Ctrl-C ending the run early (a second one aborts)."""
    from taskmux.loadtest.runner import run_load

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        print("\ntaskmux loadtest: stopping; Ctrl-C again aborts", file=sys.stderr)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: no Ctrl-C
        loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        return await run_load(config, on_tick=progress, stop=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
