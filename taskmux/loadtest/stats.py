"""Latency percentiles (nearest rank) and their summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

QUANTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float] | npt.NDArray[np.float64], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values <= it.

    `sorted_values` must be sorted ascending and non-empty; q is in [0, 100]. Unlike an
    interpolated percentile, the answer is always a latency that was observed.
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], not {q}")
    rank = max(1, math.ceil(q * n / 100 - 1e-9))  # the epsilon absorbs float noise (99.9)
    return float(sorted_values[rank - 1])


@dataclass(frozen=True)
class LatencySummary:
    """Latency figures of a set of calls, in milliseconds; None when there were none."""

    count: int
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready, keyed count, mean, p50, p90, p99, p99.9, max (ms)."""
        return {
            "count": self.count,
            "mean": _round(self.mean_ms),
            "p50": _round(self.p50_ms),
            "p90": _round(self.p90_ms),
            "p99": _round(self.p99_ms),
            "p99.9": _round(self.p999_ms),
            "max": _round(self.max_ms),
        }


def summarize(latencies_s: npt.NDArray[np.float64]) -> LatencySummary:
    """Summarise latencies given in seconds."""
    if latencies_s.size == 0:
        return LatencySummary(0)
    ms = np.sort(latencies_s) * 1000.0
    p50, p90, p99, p999 = (percentile(ms, q) for q in QUANTILES)
    return LatencySummary(int(ms.size), float(ms.mean()), p50, p90, p99, p999, float(ms[-1]))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
