"""A PNG of a run: latency histogram and CDF, answers per second and latency over time.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global state).
matplotlib is a development dependency; it is imported only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from taskmux.loadtest.report import LoadReport


def save_plot(report: LoadReport, path: Path) -> None:
    """Write the report's plots to `path` as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 11), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplot_mosaic([["hist", "cdf"], ["rate", "rate"], ["time", "time"]])
    c = report.config
    load = f"{c.concurrency} callers" if c.mode == "closed" else f"{c.rate:g} req/s Poisson"
    fig.suptitle(
        f"taskmux loadtest: {c.mode} loop, {load}, {c.connections} conn, mix {len(c.mix)} "
        f"task(s) - {report.requests_per_s:.1f} req/s, {report.errors} errors"
    )
    _latency_panels(report, axes["hist"], axes["cdf"])
    _rate_panel(report, axes["rate"])
    _latency_over_time_panel(report, axes["time"], xlim=axes["rate"].get_xlim())
    fig.savefig(path, format="png", dpi=100)


def _latency_panels(report: LoadReport, hist: Any, cdf: Any) -> None:
    """The latency histogram (ok and errors stacked) and CDF with p50 and p99 marked."""
    samples = report.samples
    measured = samples.measured
    ok_ms = samples.latency_s[measured & samples.ok] * 1000.0
    err_ms = samples.latency_s[measured & ~samples.ok] * 1000.0
    all_ms = np.sort(samples.latency_s[measured] * 1000.0)
    if all_ms.size:
        low = max(float(all_ms[0]), 0.01)
        high = max(float(all_ms[-1]), low * 1.01)
        bins = [float(b) for b in np.geomspace(low, high, 60)]
        groups = [(ok_ms, "ok"), (err_ms, "errors")]
        groups = [(values, name) for values, name in groups if values.size]
        hist.hist(
            [values for values, _ in groups],
            bins=bins,
            stacked=True,
            label=[name for _, name in groups],
        )
        hist.set_xscale("log")
        hist.legend()
        ys = np.arange(1, all_ms.size + 1) / all_ms.size
        cdf.plot(all_ms, ys, label="all calls")
        if ok_ms.size:
            cdf.plot(np.sort(ok_ms), np.arange(1, ok_ms.size + 1) / ok_ms.size, label="ok")
        for q, value in (("p50", report.latency.p50_ms), ("p99", report.latency.p99_ms)):
            if value is not None:
                cdf.axvline(value, linestyle=":", color="grey")
                cdf.annotate(q, (value, 0.05), rotation=90, color="grey", ha="right")
        cdf.set_xscale("log")
        cdf.legend(loc="lower right")
    hist.set(title="latency histogram (measured)", xlabel="ms", ylabel="calls")
    cdf.set(title="latency CDF (measured)", xlabel="ms", ylabel="fraction of calls", ylim=(0, 1))


def _rate_panel(report: LoadReport, timeline: Any) -> None:
    """Answers (ok, errors, dropped) per second over the run, the warm-up shaded."""
    line = report.timeline
    timeline.step(line.t_s, line.ok_per_s, where="post", label="ok/s")
    if any(line.errors_per_s):
        timeline.step(line.t_s, line.errors_per_s, where="post", label="errors/s")
    if any(line.dropped_per_s):
        timeline.step(line.t_s, line.dropped_per_s, where="post", label="dropped/s")
    if report.config.warmup_s > 0:
        timeline.axvspan(0, report.config.warmup_s, color="grey", alpha=0.2, label="warm-up")
    timeline.set(
        title=f"answers per second ({line.bucket_s:g} s buckets)",
        xlabel="s since start",
        ylabel="per second",
    )
    timeline.legend(loc="upper right")


def _latency_over_time_panel(report: LoadReport, over_time: Any, *, xlim: Any) -> None:
    """Each call's latency by when it ended, on the rate panel's time axis."""
    samples = report.samples
    ok = samples.ok
    for mask, name in ((ok, "ok"), (~ok, "errors")):
        if mask.any():
            over_time.scatter(
                samples.end_s[mask], samples.latency_s[mask] * 1000.0, s=4, label=name
            )
    if report.config.warmup_s > 0:
        over_time.axvspan(0, report.config.warmup_s, color="grey", alpha=0.2, label="warm-up")
    over_time.set(
        title="latency of each call by when it ended",
        xlabel="s since start",
        ylabel="ms",
        yscale="log",
        xlim=xlim,
    )
    over_time.legend(loc="upper right")
