"""What the encoder's single-thread replicas (TASKMUX_ENCODER_REPLICAS) and its second,
spinning multi-thread session (TASKMUX_ORT_SPIN_IN_RUN=auto) cost and gain. The spinning
session serves only a worker's lone batches, never these in-process runs, so here it shows
its memory only; its gain at c=1 is measured through the worker by `bench/ab.py`.

Each setting runs in a fresh process, the settings alternating round by round: the worker's
own model load (`LoadedModel.load`), raw texts/s at batch 1 and 32 on short texts
(`bench.raw.measure_raw`), then the process's resident memory (VmRSS) and its peak (VmHWM).

    python -m bench.replicas --repo model-repo --rounds 3 --duration 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.peers import SHORT_WORDS, _texts
from bench.raw import measure_raw
from model.loaded import LoadedModel
from model.spin import SpinInRun
from workers.settings import WorkerSettings

# Name: (TASKMUX_ENCODER_REPLICAS, TASKMUX_ORT_SPIN_IN_RUN); the last is the default.
SETTINGS: dict[str, tuple[int, SpinInRun]] = {
    "replicas off, spin off": (1, "off"),
    "replicas auto, spin off": (0, "off"),
    "replicas auto, spin auto": (0, "auto"),
}


def measure(repo: Path, setting: str, duration_s: float) -> dict[str, float]:
    """One setting's figures, in this process."""
    replicas, spin_in_run = SETTINGS[setting]
    settings = WorkerSettings(
        model_repo=repo, encoder_replicas=replicas, ort_spin_in_run=spin_in_run
    )
    encoder = LoadedModel.load(settings).encoder
    raw = measure_raw(encoder, _texts(str(SHORT_WORDS)), [32], duration_s)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    encoder.close()
    return {
        "batch1_texts_s": 1000 / raw.batch1_p50_ms,
        "batch32_texts_s": raw.throughput_by_batch[32],
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m bench.replicas`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path("model-repo"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.repo, args.child, args.duration)))
        return 0
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        names = list(SETTINGS) if round_ % 2 == 0 else list(SETTINGS)[::-1]
        for name in names:
            cmd = [sys.executable, "-m", "bench.replicas", "--repo", str(args.repo)]
            cmd += ["--duration", str(args.duration), "--child", name]
            # Fixed argv: this interpreter and this module, no shell.
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)  # nosec B603
            out = done.stdout
            results[name].append(json.loads(out.splitlines()[-1]))
            figures = ", ".join(f"{k} {v:.1f}" for k, v in results[name][-1].items())
            print(f"round {round_} {name}: {figures}", flush=True)
    for name, runs in results.items():
        medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"median {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
