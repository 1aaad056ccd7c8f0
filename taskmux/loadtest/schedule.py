"""When requests go out and which task each one is: seeded Poisson arrivals, weighted picks."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence


def cumulative(weights: Sequence[float]) -> list[float]:
    """Running sums of `weights`, for random.choices(cum_weights=...)."""
    return list(itertools.accumulate(weights))


def poisson_arrivals(rate: float, rng: random.Random, start: float = 0.0) -> Iterator[float]:
    """Arrival times of a Poisson process: exponential gaps with mean 1/rate, forever."""
    if not rate > 0:
        raise ValueError("rate must be > 0")
    t = start
    while True:
        t += rng.expovariate(rate)
        yield t


class Picker:
    """Picks a task index by weight, and the next prebuilt request of that task in turn."""

    def __init__(self, weights: Sequence[float], pool_sizes: Sequence[int], seed: int) -> None:
        self._rng = random.Random(seed)
        self._indices = range(len(weights))
        self._cum_weights = cumulative(weights)
        self._sizes = tuple(pool_sizes)
        self._next = [0] * len(weights)

    def pick(self) -> tuple[int, int]:
        """(task index, request index within that task's pool)."""
        task = self._rng.choices(self._indices, cum_weights=self._cum_weights)[0]
        i = self._next[task]
        self._next[task] = (i + 1) % self._sizes[task]
        return task, i
