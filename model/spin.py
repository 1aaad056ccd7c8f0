"""Whether ONNX Runtime's threads should spin within a run: measured, not guessed.

A multi-thread session whose threads sleep between one operator's parallel part and the
next pays a thread wake-up each time, which is most of a lone short text's encoder time
above its spinning cost (a one-off in-process measurement on this 2-core machine,
2026-12-05: one 16-token text, 3.8 ms sleeping against 2.6 ms spinning). Spinning only
pays while the session's threads have the cores: with another process busy on one of
them, a spinning thread waits on a descheduled peer instead (same measurement, about
90 tokens: 14.0 ms spinning against 12.4 ms sleeping; quiet, 9.0 against 10.5).

So with `TASKMUX_ORT_SPIN_IN_RUN=auto` the encoder opens its multi-thread session both
ways and `SpinChooser` times the runs of each: every batch goes to whichever has been
faster lately on batches of its size, and one in EXPLORE_EVERY goes to the other, so a
change in what else runs on the machine is noticed within a few dozen batches. Only a
batch run alone (a worker's lone small batch, computed inline: `Encoder.encode_full`)
is offered the choice. Under load a run's own time is the wrong measure: the cores a
spinning thread takes belong to the gateway and Redis (interleaved A/B of 2026-12-05,
spinning offered to every small batch: c=64 0.96x the texts/s, worker CPU per call 1.04x).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from typing import Literal

SpinInRun = Literal["off", "on", "auto"]

# Recent runs kept per size and way; the median of these decides.
WINDOW = 9
# Runs each way a size needs before the faster one is chosen.
MIN_SAMPLES = 3
# One run in this many goes the other way, to keep its times current.
EXPLORE_EVERY = 16


class SpinChooser:
    """Picks spinning or sleeping threads for each run by the recent times of both.

    Runs are compared within size classes (padded tokens, by powers of two), because a
    run's time grows with its size and the two ways may see different mixes of sizes.
    Thread-safe: batches of one worker run one at a time, but offline callers may share
    an encoder across threads."""

    def __init__(self) -> None:
        self._times: dict[tuple[int, bool], deque[float]] = {}
        self._runs = 0
        self._lock = threading.Lock()

    def spin(self, padded_tokens: int) -> bool:
        """True to run a batch of `padded_tokens` on the spinning session."""
        size = padded_tokens.bit_length()
        with self._lock:
            self._runs += 1
            spinning = self._times.get((size, True), ())
            sleeping = self._times.get((size, False), ())
            if len(spinning) < MIN_SAMPLES or len(sleeping) < MIN_SAMPLES:
                return len(spinning) < len(sleeping)  # fill both, sleeping first
            faster = statistics.median(spinning) < statistics.median(sleeping)
            return faster != (self._runs % EXPLORE_EVERY == 0)

    def record(self, padded_tokens: int, spin: bool, seconds: float) -> None:
        """The time one run took the way `spin` says."""
        key = (padded_tokens.bit_length(), spin)
        with self._lock:
            self._times.setdefault(key, deque(maxlen=WINDOW)).append(seconds)
