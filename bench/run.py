"""`make bench`: one run, one report (bench/report.md, bench/throughput_latency.png).

Measured side by side on this machine, in this order, each bounded in time and with
warm-up excluded:
  1. the limit: raw in-process ONNX Runtime (same model, precision, threads), batch 1
     and the best batch size;
  2. one separate encoder per task (what users run today) serving a four-head mix;
  3. the full system (client -> gateway -> Redis -> worker -> back) at concurrency
     1, 8 and 64: `embed` alone, then the same four-head mix through Analyze,
     with the gateway profiled by py-spy during the heaviest run.
Only ratios measured in the same run are compared. Timing never decides a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from bench.raw import RawResult, measure_raw, measure_separate_encoders
from bench.report import Floors, write_plot, write_report
from bench.system import child_pid, load, profile, running_system, top_frames
from taskmux.loadtest.report import LoadReport
from taskmux.loadtest.texts import TextGenerator
from workers.model import LoadedModel
from workers.settings import WorkerSettings

CONCURRENCY = (1, 8, 64)
MIX_HEADS = ("embed", "sentiment", "topic", "intent")
LENGTHS = "6,24,96"  # words: about 8 to 128 tokens
BATCH_SIZES = (1, 8, 16, 32, 64)


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m bench.run`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path("model-repo"))
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = replace(WorkerSettings.from_env(os.environ), model_repo=args.repo)

    texts = _texts(512)
    model = LoadedModel.load(settings)
    missing = [h for h in MIX_HEADS if h not in model.heads]
    if missing:
        print(f"bench: the model repository lacks heads {missing}", file=sys.stderr)
        return 2
    print(f"bench: raw ONNX Runtime ({model.encoder.provider})", file=sys.stderr)
    raw = measure_raw(model.encoder, texts, BATCH_SIZES, args.duration)
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
    print((args.out / "report.md").read_text())
    return 0


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
