"""`make bench`: one run, one report (bench/report.md, bench/throughput_latency.png).

Measured side by side on this machine, in this order, each bounded in time and with
warm-up excluded:
  1. the limit: raw in-process ONNX Runtime (same model, precision, threads), batch 1
     and the best batch size;
  2. one separate encoder per task (what users run today) serving a four-head mix;
  3. the full system (client -> gateway -> Redis -> worker -> back) at concurrency
     1, 8 and 64: `embed` alone, then the same four-head mix through Analyze,
     with the gateway profiled by py-spy during the heaviest run;
  4. what TLS, API keys, per-tenant limits and tracing add to one Embed call, four
     configurations side by side (bench/security.py);
  5. side by side: raw ONNX Runtime, a plain grpc.aio server without queue or batching,
     and taskmux, on short and mixed texts, one cell right after the other; with
     py-spy on the gateway and the worker under c=64 short texts (bench/peers.py);
  6. three workers behind one gateway under the default client's keyed load: each
     worker's share of a burst, and Redis memory under a steady load (bench/workers.py);
  7. what the trained heads cost: Analyze of embed + sentiment + intent + topic +
     entities against Embed alone, 32 texts per request (bench/analyze_cost.py).
Every load sends a fresh idempotency key per call, as the default client does.
`--only security` (or `--only peers`, `--only workers`, `--only analyze`) runs that part
alone and merges
its section into the existing report; `--skip security` leaves it out. Only ratios
measured in the same run are compared.
Timing never decides a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from bench import analyze_cost
from bench.peers import peers_lines, run_peers
from bench.raw import RawResult, best_of, measure_raw, measure_separate_encoders
from bench.report import (
    Floors,
    merge_section,
    security_lines,
    workers_lines,
    write_memory_plot,
    write_plot,
    write_report,
)
from bench.security import VARIANTS, figures, run_security
from bench.system import child_pid, load, profile, running_system, top_frames
from bench.workers import BURST_CALLERS, BURST_CALLS, SOAK_S, STEADY_CALLERS, run_workers
from model.loaded import LoadedModel
from taskmux.loadtest.report import LoadReport
from taskmux.loadtest.texts import TextGenerator
from workers.settings import WorkerSettings

CONCURRENCY = (1, 8, 64)
MIX_HEADS = ("embed", "sentiment", "topic", "intent")
LENGTHS = "6,24,96"  # words: about 8 to 128 tokens
BATCH_SIZES = (1, 8, 16, 32, 64)
# "system": parts 1 to 3, which write a new report
PARTS = ("system", "security", "peers", "workers", "analyze")


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m bench.run`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path("model-repo"))
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--only", choices=PARTS, help="run one part; merge its report section")
    parser.add_argument("--skip", choices=PARTS, action="append", default=[])
    parser.add_argument("--security-rounds", type=int, default=6, metavar="N")
    parser.add_argument("--analyze-rounds", type=int, default=2, metavar="N")
    parser.add_argument(
        "--soak-s", type=float, default=SOAK_S, help="workers: seconds of steady load"
    )
    parser.add_argument("--steady-callers", type=int, default=STEADY_CALLERS, metavar="N")
    parser.add_argument("--burst-callers", type=int, default=BURST_CALLERS, metavar="N")
    parser.add_argument("--burst-calls", type=int, default=BURST_CALLS, metavar="N")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = [args.only] if args.only else [p for p in PARTS if p not in args.skip]
    if "system" in parts:
        status = _system(args)
        if status:
            return status
    if "security" in parts:
        _security(args, merged=args.only == "security")
    if "peers" in parts:
        _peers(args, merged=args.only == "peers")
    if "workers" in parts:
        _workers(args, merged=args.only == "workers")
    if "analyze" in parts:
        _analyze_cost(args, merged=args.only == "analyze")
    print((args.out / "report.md").read_text())
    return 0


def _system(args: argparse.Namespace) -> int:
    """Parts 1 to 3: raw ONNX Runtime, separate encoders, the full system; a new report."""
    settings = replace(WorkerSettings.from_env(os.environ), model_repo=args.repo)

    texts = _texts(512)
    model = LoadedModel.load(settings)
    missing = [h for h in MIX_HEADS if h not in model.heads]
    if missing:
        print(f"bench: the model repository lacks heads {missing}", file=sys.stderr)
        return 2
    print(f"bench: raw ONNX Runtime ({model.encoder.provider})", file=sys.stderr)
    spinning = LoadedModel.load(replace(settings, ort_spin=not settings.ort_spin)).encoder
    runs = [measure_raw(e, texts, BATCH_SIZES, args.duration) for e in (model.encoder, spinning)]
    raw = best_of(runs)  # raw ONNX Runtime at its best, threads spinning or not
    del spinning
    print("bench: one encoder per task", file=sys.stderr)
    separate = _separate(settings, model, texts, raw, args.duration)
    variant = str(getattr(model.encoder, "variant", "fp32"))
    del model
    gc.collect()

    system: dict[str, dict[int, LoadReport]] = {"embed": {}, "mix": {}}
    mix = "analyze:" + "+".join(MIX_HEADS)
    hot_frames: list[tuple[str, float]] = []
    with running_system(args.repo, args.out / "system.log") as (target, up):
        for name, spec in (("embed", "embed"), ("mix", mix)):
            for c in CONCURRENCY:
                print(f"bench: full system, {name}, concurrency {c}", file=sys.stderr)
                spy = None
                if name == "embed" and c == max(CONCURRENCY):
                    gateway = child_pid(up.pid, "gateway")
                    if gateway is not None:
                        raw_profile = args.out / "gateway-profile.txt"
                        spy = (profile(gateway, args.duration, raw_profile), raw_profile)
                report = load(target, spec, c, LENGTHS, args.duration, args.warmup)
                system[name][c] = report
                if spy is not None:
                    spy[0].wait(args.duration + 30)
                    if spy[1].exists():
                        hot_frames = top_frames(spy[1])
    floors = Floors.check(raw, separate, system)
    write_plot(system, args.out / "throughput_latency.png")
    write_report(args.out / "report.md", raw, separate, system, floors, hot_frames, variant, args)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "raw": raw.__dict__ | {"best_batch": raw.best_batch},
                "separate_encoders_texts_per_s": separate,
                "system": {k: {c: r.to_dict() for c, r in v.items()} for k, v in system.items()},
                "ratios": floors.__dict__,
            },
            indent=2,
            default=str,
        )
    )
    return 0


def _security(args: argparse.Namespace, *, merged: bool) -> None:
    """Part 4; its section replaces the report's, and its figures go into results.json."""
    print("bench: security and observability, four configurations", file=sys.stderr)
    # More, shorter rounds than parts 1-3 use: drift on a shared machine then falls on
    # every configuration alike, and the pooled latencies keep as many calls.
    duration, warmup = args.duration / 2, args.warmup / 2
    runs = run_security(args.repo, args.out, args.security_rounds, duration, warmup)
    provenance = _provenance("security", merged)
    merge_section(args.out / "report.md", security_lines(runs, warmup, provenance))
    results = args.out / "results.json"
    data = json.loads(results.read_text()) if results.exists() else {}
    data["security"] = {v.name: asdict(figures(runs, v.name)) for v in VARIANTS} | {
        "charged_units": runs.charged_units,
        "spans_gateway_worker": runs.spans,
    }
    results.write_text(json.dumps(data, indent=2, default=str))


def _workers(args: argparse.Namespace, *, merged: bool) -> None:
    """Part 6; its section replaces the report's, and its figures go into results.json."""
    print("bench: three workers under the default client's keyed load", file=sys.stderr)
    run = run_workers(
        args.repo,
        args.out,
        soak_s=args.soak_s,
        steady_callers=args.steady_callers,
        burst_callers=args.burst_callers,
        burst_calls=args.burst_calls,
    )
    provenance = (
        "Measured by `python -m bench.run --only workers` and merged into the report of an "
        "earlier full run: the other sections are not from this run."
        if merged
        else "Measured in the same run as the sections above, after them."
    )
    write_memory_plot(run, args.out / "workers_memory.png")
    merge_section(args.out / "report.md", workers_lines(run, provenance))
    _merge_results(args.out / "results.json", "workers", run.to_dict())


def _peers(args: argparse.Namespace, *, merged: bool) -> None:
    """Part 5; its section replaces the report's, and its figures go into results.json."""
    runs = run_peers(args.repo, args.out, args.duration, args.warmup)
    lines = peers_lines(runs, args.duration, _provenance("peers", merged))
    merge_section(args.out / "report.md", lines)
    _merge_results(args.out / "results.json", "peers", runs.to_dict())


def _analyze_cost(args: argparse.Namespace, *, merged: bool) -> None:
    """Part 7; its section replaces the report's, and its figures go into results.json."""
    print("bench: Analyze of five heads against Embed alone", file=sys.stderr)
    cost = analyze_cost.measure(
        args.repo, args.out, args.analyze_rounds, args.duration, args.warmup
    )
    lines = analyze_cost.report_lines(cost, _provenance("analyze", merged))
    merge_section(args.out / "report.md", lines)
    _merge_results(args.out / "results.json", "analyze_cost", cost.to_dict())


def _provenance(part: str, merged: bool) -> str:
    """Where a section's figures come from, and when: on a shared machine the same code
    measures differently from one day to the next, so a section is read with its date."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Measured by `python -m bench.run --only {part}` ({when}) and merged into the "
        "report of an earlier full run: the other sections are not from this run."
        if merged
        else f"Measured in the same run as the sections above ({when}), after them."
    )


def _merge_results(path: Path, key: str, value: object) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2, default=str))


def _texts(n: int) -> list[str]:
    words = [int(w) for w in LENGTHS.split(",")]
    generator = TextGenerator(seed=7)
    return [generator.text(words[i % len(words)]) for i in range(n)]


def _separate(
    settings: WorkerSettings, model: LoadedModel, texts: list[str], raw: RawResult, duration: float
) -> float:
    encoders = [model.encoder] + [LoadedModel.load(settings).encoder for _ in MIX_HEADS[1:]]
    heads = [model.heads[h] for h in MIX_HEADS]
    return measure_separate_encoders(encoders, heads, texts, raw.best_batch, duration)


if __name__ == "__main__":
    sys.exit(main())
