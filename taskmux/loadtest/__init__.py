"""Load testing a taskmux deployment through its real gRPC API (`taskmux loadtest`).

Library use (e.g. from `make bench`)::

    import asyncio, json
    from taskmux.loadtest import LoadConfig, parse_lengths, parse_mix, run_load

    config = LoadConfig(
        target="127.0.0.1:50051",
        mode="open",                # "closed": `concurrency` callers back to back
        rate=200.0,                 # open loop: Poisson arrivals, requests/s
        duration_s=30.0,            # measured seconds after the warm-up (or None)
        warmup_s=2.0,               # calls started before this are left out
        requests=None,              # or a number of measured requests (first bound wins)
        mix=parse_mix("embed=2,classify:sentiment=1,analyze:embed+sentiment=1"),
        lengths=parse_lengths("8,32,128"),
        texts_per_request=1,
        connections=8,              # gRPC channels, one HTTP/2 connection each
        deadline_s=10.0,
        seed=0,
        idempotency_keys=True,      # a fresh key per call, as taskmux_client sends
    )
    report = asyncio.run(run_load(config))
    print(report.requests_per_s, report.latency.p99_ms, report.errors_by_code)
    json.dumps(report.to_dict())

`async def run_load(config: LoadConfig, *, on_tick=None, tick_s=0.5, stop=None) ->
LoadReport` never raises for failed calls; it counts them by gRPC status code. It always
ends by itself: at `duration_s` / `requests`, then waits for calls in flight, each bounded
by `deadline_s`. Setting the `stop` event ends it early. `on_tick(LiveStatus)` drives a
progress display (`Progress` prints the CLI's). `save_plot(report, path)` writes a PNG
(needs matplotlib). The modules: config (LoadConfig, the mix and lengths specs), texts
(seeded English-like texts), calls (prebuilt requests, one send), schedule (Poisson
arrivals, weighted picks), samples (per-call record), stats (percentiles), report
(LoadReport and its JSON and text forms), runner, progress, plot, cli.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskmux.loadtest.config import (
        ConfigError,
        LoadConfig,
        MixEntry,
        format_lengths,
        format_mix,
        parse_lengths,
        parse_mix,
    )
    from taskmux.loadtest.plot import save_plot
    from taskmux.loadtest.progress import Progress
    from taskmux.loadtest.report import LoadReport, TaskFigures, Timeline, format_text
    from taskmux.loadtest.runner import run_load
    from taskmux.loadtest.samples import LiveStatus, Samples
    from taskmux.loadtest.stats import LatencySummary, percentile

# Imported on first use, so that `taskmux --help` and the other commands do not pay for
# grpc.aio and numpy.
_MODULES = {
    "ConfigError": "config",
    "LoadConfig": "config",
    "MixEntry": "config",
    "format_lengths": "config",
    "format_mix": "config",
    "parse_lengths": "config",
    "parse_mix": "config",
    "save_plot": "plot",
    "Progress": "progress",
    "LoadReport": "report",
    "TaskFigures": "report",
    "Timeline": "report",
    "format_text": "report",
    "run_load": "runner",
    "LiveStatus": "samples",
    "Samples": "samples",
    "LatencySummary": "stats",
    "percentile": "stats",
}

__all__ = [
    "ConfigError",
    "LatencySummary",
    "LiveStatus",
    "LoadConfig",
    "LoadReport",
    "MixEntry",
    "Progress",
    "Samples",
    "TaskFigures",
    "Timeline",
    "format_lengths",
    "format_mix",
    "format_text",
    "parse_lengths",
    "parse_mix",
    "percentile",
    "run_load",
    "save_plot",
]


def __getattr__(name: str) -> object:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
