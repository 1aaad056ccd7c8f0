"""The figures of a run: `LoadReport`, its JSON form and its text form.

Counting rules: a call is measured when it started (open loop: was due) after the warm-up.
`sent` = `ok` + `errors` always holds: the run waits for every call it sent, each bounded
by its deadline. `dropped` arrivals (open loop, over max_outstanding) were never sent.
Latency is given over all measured calls (errors included: a fast UNAVAILABLE or a slow
DEADLINE_EXCEEDED is part of what callers see) and over successes alone.
Throughput divides by the measured window: from the end of the warm-up to the later of
the last send and the last answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from taskmux.loadtest.config import LoadConfig
from taskmux.loadtest.samples import Samples
from taskmux.loadtest.stats import LatencySummary, summarize

_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class TaskFigures:
    """Counts and latency of one mix entry (measured calls only)."""

    label: str
    sent: int
    ok: int
    errors: int
    dropped: int
    errors_by_code: dict[str, int]
    latency: LatencySummary  # every call, errors included
    latency_ok: LatencySummary  # successful calls

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "dropped": self.dropped,
            "errors_by_code": self.errors_by_code,
            "latency_ms": self.latency.to_dict(),
            "latency_ok_ms": self.latency_ok.to_dict(),
        }


@dataclass(frozen=True)
class Timeline:
    """Answers per second over the whole run (warm-up included), in buckets of `bucket_s`."""

    bucket_s: float
    t_s: tuple[float, ...]  # start of each bucket, seconds from the start of the run
    ok_per_s: tuple[float, ...]
    errors_per_s: tuple[float, ...]
    dropped_per_s: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, as parallel lists."""
        return {
            "bucket_s": self.bucket_s,
            "t_s": list(self.t_s),
            "ok_per_s": list(self.ok_per_s),
            "errors_per_s": list(self.errors_per_s),
            "dropped_per_s": list(self.dropped_per_s),
        }


@dataclass(frozen=True)
class LoadReport:
    """The result of `run_load`."""

    config: LoadConfig
    elapsed_s: float  # the whole run: warm-up, measured window, waiting for the last calls
    measured_s: float  # the window that throughput is divided by
    sent: int  # measured calls sent
    ok: int
    errors: int
    dropped: int  # open loop: due arrivals not sent (too many in flight)
    warmup_calls: int  # calls started during the warm-up, left out of every figure
    texts_ok: int  # texts in successful calls (a similarity query and candidates each count)
    requests_per_s: float  # measured calls answered (ok or not) per second
    ok_per_s: float  # successful calls per second
    texts_per_s: float  # texts_ok per second
    latency: LatencySummary  # every measured call, errors included
    latency_ok: LatencySummary  # successful calls only
    errors_by_code: dict[str, int]  # gRPC status name -> count (CLIENT_ERROR: not a status)
    error_examples: dict[str, str]  # gRPC status name -> the first error message seen
    by_task: tuple[TaskFigures, ...]
    timeline: Timeline
    max_send_lag_ms: float  # open loop: how late the client sent its worst call; 0 closed
    interrupted: bool  # stopped early by the caller's stop event (e.g. Ctrl-C)
    samples: Samples = field(repr=False, compare=False)  # raw per-call data, for plots

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form of every figure (not the raw samples)."""
        return {
            "config": self.config.to_dict(),
            "elapsed_s": round(self.elapsed_s, 3),
            "measured_s": round(self.measured_s, 3),
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "dropped": self.dropped,
            "warmup_calls": self.warmup_calls,
            "texts_ok": self.texts_ok,
            "throughput": {
                "requests_per_s": round(self.requests_per_s, 3),
                "ok_per_s": round(self.ok_per_s, 3),
                "texts_per_s": round(self.texts_per_s, 3),
            },
            "latency_ms": self.latency.to_dict(),
            "latency_ok_ms": self.latency_ok.to_dict(),
            "errors_by_code": self.errors_by_code,
            "error_examples": self.error_examples,
            "by_task": {t.label: t.to_dict() for t in self.by_task},
            "timeline": self.timeline.to_dict(),
            "max_send_lag_ms": round(self.max_send_lag_ms, 3),
            "interrupted": self.interrupted,
        }


def build_report(
    config: LoadConfig,
    texts_per_task: tuple[int, ...],
    samples: Samples,
    *,
    last_send_s: float,
    elapsed_s: float,
    max_send_lag_s: float,
    interrupted: bool,
) -> LoadReport:
    """Compute every figure from the samples; times are seconds from the start of the run."""
    measured = samples.measured
    ok = samples.ok & measured
    latency = samples.latency_s
    texts = np.array(texts_per_task, dtype=np.int64)[samples.task] if samples.task.size else None
    texts_ok = int(texts[ok].sum()) if texts is not None else 0
    ends = samples.end_s[measured]
    window_end = max(last_send_s, float(ends.max()) if ends.size else 0.0)
    measured_s = max(0.0, window_end - samples.warmup_s)
    sent, n_ok = int(measured.sum()), int(ok.sum())
    drops = samples.drop_s >= samples.warmup_s

    def rate(count: int) -> float:
        return count / measured_s if measured_s > 0 else 0.0

    by_task = tuple(
        _task_figures(entry.label, i, samples, measured, drops)
        for i, entry in enumerate(config.mix)
    )
    return LoadReport(
        config=config,
        elapsed_s=elapsed_s,
        measured_s=measured_s,
        sent=sent,
        ok=n_ok,
        errors=sent - n_ok,
        dropped=int(drops.sum()),
        warmup_calls=int((~measured).sum()),
        texts_ok=texts_ok,
        requests_per_s=rate(sent),
        ok_per_s=rate(n_ok),
        texts_per_s=rate(texts_ok),
        latency=summarize(latency[measured]),
        latency_ok=summarize(latency[ok]),
        errors_by_code=_codes(samples, measured & ~samples.ok),
        error_examples=dict(samples.error_examples),
        by_task=by_task,
        timeline=_timeline(samples, elapsed_s),
        max_send_lag_ms=max_send_lag_s * 1000.0,
        interrupted=interrupted,
        samples=samples,
    )


def _codes(samples: Samples, mask: npt.NDArray[np.bool_]) -> dict[str, int]:
    counts = Counter(int(c) for c in samples.code[mask])
    return {samples.codes[c]: n for c, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def _task_figures(
    label: str,
    index: int,
    samples: Samples,
    measured: npt.NDArray[np.bool_],
    drops: npt.NDArray[np.bool_],
) -> TaskFigures:
    mine = measured & (samples.task == index)
    ok = mine & samples.ok
    sent, n_ok = int(mine.sum()), int(ok.sum())
    return TaskFigures(
        label=label,
        sent=sent,
        ok=n_ok,
        errors=sent - n_ok,
        dropped=int((drops & (samples.drop_task == index)).sum()),
        errors_by_code=_codes(samples, mine & ~samples.ok),
        latency=summarize(samples.latency_s[mine]),
        latency_ok=summarize(samples.latency_s[ok]),
    )


def _timeline(samples: Samples, elapsed_s: float) -> Timeline:
    bucket = next((b for b in _BUCKETS_S if elapsed_s / b <= 40), _BUCKETS_S[-1])
    n = max(1, int(np.ceil(elapsed_s / bucket)))
    edges = np.arange(n + 1) * bucket

    def per_s(times: npt.NDArray[np.float64]) -> tuple[float, ...]:
        counts, _ = np.histogram(np.clip(times, 0, edges[-1] - 1e-9), bins=edges)
        return tuple(float(c) / bucket for c in counts)

    return Timeline(
        bucket_s=bucket,
        t_s=tuple(float(t) for t in edges[:-1]),
        ok_per_s=per_s(samples.end_s[samples.ok]),
        errors_per_s=per_s(samples.end_s[~samples.ok]),
        dropped_per_s=per_s(samples.drop_s),
    )


def format_text(report: LoadReport) -> str:
    """A short human-readable summary."""
    c = report.config
    who = f"{c.concurrency} callers" if c.mode == "closed" else f"Poisson {c.rate:g} req/s"
    lines = [
        f"taskmux loadtest: {c.mode} loop, {who}, {c.connections} connection(s) to {c.target}, "
        f"idempotency keys {'on' if c.idempotency_keys else 'off'}",
        f"measured {report.measured_s:.2f} s after a {c.warmup_s:g} s warm-up "
        f"({report.warmup_calls} warm-up calls left out)"
        + (" - interrupted" if report.interrupted else ""),
        f"calls: {report.sent} sent, {report.ok} ok, {report.errors} errors, "
        f"{report.dropped} dropped",
        f"throughput: {report.requests_per_s:.1f} req/s ({report.ok_per_s:.1f} ok/s), "
        f"{report.texts_per_s:.1f} texts/s",
        f"{'latency ms':<28}{'count':>7}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}"
        f"{'p99.9':>9}{'max':>9}",
        _latency_row("all calls", report.latency),
        _latency_row("successes", report.latency_ok),
    ]
    if len(report.by_task) > 1:
        lines += [_latency_row(f"  {t.label}", t.latency) for t in report.by_task]
    if c.mode == "open":
        lines.append(f"client send lag: max {report.max_send_lag_ms:.1f} ms")
    for code, count in report.errors_by_code.items():
        example = report.error_examples.get(code, "")
        lines.append(f"error {code}: {count}" + (f" (e.g. {example[:160]!r})" if example else ""))
    return "\n".join(lines)


def _latency_row(name: str, s: LatencySummary) -> str:
    values = (s.mean_ms, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms)
    cells = "".join(f"{v:>9.1f}" if v is not None else f"{'-':>9}" for v in values)
    return f"{name[:27]:<28}{s.count:>7}{cells}"
