"""What happened to every call: recorded while the run goes, as arrays once it is over."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from taskmux.loadtest.calls import OK


@dataclass(frozen=True)
class LiveStatus:
    """Counters so far, for the progress line (warm-up calls included)."""

    elapsed_s: float
    sent: int
    ok: int
    errors: int
    dropped: int
    in_flight: int
    measured_sent: int  # calls sent after the warm-up


@dataclass(frozen=True)
class Samples:
    """Every call of a run, one array element per call, times in seconds from the start.

    A call belongs to the measured figures when it started at or after `warmup_s`
    (open loop: when it was due, so waiting in the client counts as latency).
    """

    warmup_s: float
    codes: tuple[str, ...]  # status names; codes[0] is "OK"
    start_s: npt.NDArray[np.float64]
    end_s: npt.NDArray[np.float64]
    task: npt.NDArray[np.int32]  # index into the mix
    code: npt.NDArray[np.int32]  # index into codes
    drop_s: npt.NDArray[np.float64]  # open loop: when each dropped arrival was due
    drop_task: npt.NDArray[np.int32]
    error_examples: dict[str, str] = field(default_factory=dict)  # first details per code

    @property
    def latency_s(self) -> npt.NDArray[np.float64]:
        """End minus start of every call."""
        return self.end_s - self.start_s

    @property
    def measured(self) -> npt.NDArray[np.bool_]:
        """Mask of the calls that count (started after the warm-up)."""
        return self.start_s >= self.warmup_s

    @property
    def ok(self) -> npt.NDArray[np.bool_]:
        """Mask of the successful calls."""
        return np.equal(self.code, 0)


class Recorder:
    """Collects outcomes as they happen; cheap enough to call on every request."""

    def __init__(self, t0: float, warmup_s: float) -> None:
        self._t0 = t0
        self._warmup_s = warmup_s
        self.sent = 0
        self.ok = 0
        self.errors = 0
        self.dropped = 0
        self.in_flight = 0
        self.measured_sent = 0
        self._codes: dict[str, int] = {OK: 0}
        self._examples: dict[str, str] = {}
        self._start: list[float] = []
        self._end: list[float] = []
        self._task: list[int] = []
        self._code: list[int] = []
        self._drop: list[float] = []
        self._drop_task: list[int] = []

    def is_measured(self, start: float) -> bool:
        """Whether a call started (or due) at clock time `start` counts."""
        return start - self._t0 >= self._warmup_s

    def started(self, start: float) -> None:
        """A call was sent."""
        self.sent += 1
        self.in_flight += 1
        if self.is_measured(start):
            self.measured_sent += 1

    def finished(self, task: int, start: float, end: float, code: str, details: str) -> None:
        """A call ended with status `code` (clock times)."""
        self.in_flight -= 1
        if code == OK:
            self.ok += 1
        else:
            self.errors += 1
            self._examples.setdefault(code, details)
        index = self._codes.setdefault(code, len(self._codes))
        self._start.append(start - self._t0)
        self._end.append(end - self._t0)
        self._task.append(task)
        self._code.append(index)

    def drop(self, task: int, due: float) -> None:
        """An open-loop arrival was not sent: too many calls were in flight."""
        self.dropped += 1
        self._drop.append(due - self._t0)
        self._drop_task.append(task)

    def status(self, now: float) -> LiveStatus:
        """The counters at clock time `now`."""
        return LiveStatus(
            now - self._t0,
            self.sent,
            self.ok,
            self.errors,
            self.dropped,
            self.in_flight,
            self.measured_sent,
        )

    def samples(self) -> Samples:
        """Everything recorded, as arrays."""
        return Samples(
            warmup_s=self._warmup_s,
            codes=tuple(self._codes),
            start_s=np.array(self._start, dtype=np.float64),
            end_s=np.array(self._end, dtype=np.float64),
            task=np.array(self._task, dtype=np.int32),
            code=np.array(self._code, dtype=np.int32),
            drop_s=np.array(self._drop, dtype=np.float64),
            drop_task=np.array(self._drop_task, dtype=np.int32),
            error_examples=dict(self._examples),
        )
