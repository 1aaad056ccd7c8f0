"""Exponential backoff: the waits between tries of something that keeps failing.

One `Backoff` per retry loop: `next_s()` after each failure gives the wait before the
next try (`initial_s`, then times `multiplier`, never above `max_s`), and `reset()` after
a success starts again from `initial_s`. The loop does its own waiting (a sleep, or a
wait on a stop event), so stopping stays its concern.

The client's `RetryPolicy` (taskmux_client) is a separate, public policy: it follows the
gRPC retry rules and the server's retry hints.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Waits that grow by `multiplier` from `initial_s` up to `max_s`, until `reset`."""

    initial_s: float
    max_s: float
    multiplier: float = 2.0
    # Share of each wait drawn at random (0.2: between 80% and 100% of it), so that many
    # processes that failed together do not all retry together.
    jitter: float = 0.0
    _next_s: float = field(init=False, repr=False)
    _failed: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.multiplier < 1:
            raise ValueError(f"{self}: need 0 < initial_s <= max_s and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"{self}: jitter must be between 0 and 1")
        self._next_s = self.initial_s

    @property
    def retrying(self) -> bool:
        """True after a failure (`next_s`) until the next `reset`."""
        return self._failed

    def next_s(self) -> float:
        """The wait before the next try; the one after it is longer, up to `max_s`."""
        wait_s = self._next_s
        self._failed = True
        self._next_s = min(self._next_s * self.multiplier, self.max_s)
        if self.jitter:
            wait_s *= 1 - self.jitter * random.random()
        return wait_s

    def reset(self) -> None:
        """Back to `initial_s`: the last try succeeded."""
        self._next_s = self.initial_s
        self._failed = False
