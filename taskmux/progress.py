"""A long command's steps on stderr: one line per step with how long it took.

On a terminal the running step is redrawn in place (a bar over the steps, and the step's
elapsed time), so a minute-long export visibly moves. Anywhere else (a pipe, a CI log) each
step is one plain line when it ends, with no carriage returns. The task commands' bar
(`clioutput.ProgressBar`) counts texts per second; a step of unknown length, such as an
ONNX export, has no such count, hence this one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TextIO

BAR_WIDTH = 12
NAME_WIDTH = 44  # step names are padded to this, so the durations line up
REDRAW_EVERY_S = 0.25


class Steps:
    """Reports each `step` to `stream`; with no stream, only `durations` are kept."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self._stream = stream
        self._tty = stream is not None and (stream.isatty() if tty is None else tty)
        self._total = 0
        self.durations: dict[str, float] = {}  # step name -> seconds, in order of end

    def expect(self, total: int) -> None:
        """Say how many steps are coming, for the bar's denominator."""
        self._total = total

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Time the block as the step `what`; a failure is reported, then re-raised."""
        started = time.monotonic()
        ticker = _Ticker(self, what, started) if self._tty else None
        try:
            yield
        except BaseException:
            self._end(ticker, what, started, failed=True)
            raise
        self._end(ticker, what, started, failed=False)

    def live_line(self, what: str, elapsed_s: float) -> str:
        """The redrawn line of the running step `what`."""
        done = len(self.durations)
        total = max(self._total, done + 1)
        filled = done * BAR_WIDTH // total
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return f"[{bar}] {done + 1}/{total} {what} {elapsed_s:.0f} s"

    def write(self, text: str) -> None:
        if self._stream is not None:
            self._stream.write(text)
            self._stream.flush()

    def _end(self, ticker: _Ticker | None, what: str, started: float, *, failed: bool) -> None:
        seconds = time.monotonic() - started
        if ticker is not None:
            ticker.stop()
        self.durations[what] = seconds
        outcome = f"failed after {seconds:.1f} s" if failed else f"{seconds:6.1f} s"
        self.write(f"{what:<{NAME_WIDTH}} {outcome}\n")


class _Ticker:
    """Redraws the running step's line until stopped; owned and joined by `Steps.step`."""

    def __init__(self, steps: Steps, what: str, started: float) -> None:
        self._steps = steps
        self._what = what
        self._started = started
        self._stopped = threading.Event()
        self._width = 0
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            line = self._steps.live_line(self._what, time.monotonic() - self._started)
            self._width = max(self._width, len(line))
            self._steps.write("\r" + line)
            if self._stopped.wait(REDRAW_EVERY_S):
                return

    def stop(self) -> None:
        """Stop redrawing and blank the line, so the step's final line replaces it."""
        self._stopped.set()
        self._thread.join()
        self._steps.write("\r" + " " * self._width + "\r")
