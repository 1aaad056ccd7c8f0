"""The progress line on stderr: redrawn in place on a terminal, a plain line now and then if not."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from taskmux.loadtest.config import LoadConfig
    from taskmux.loadtest.samples import LiveStatus

BAR_WIDTH = 24
LINE_EVERY_S = 5.0  # not a terminal (a log, CI): one line this often


class Progress:
    """Turns LiveStatus ticks into a progress bar (terminal) or log lines (anything else)."""

    def __init__(self, config: LoadConfig, stream: TextIO, *, tty: bool | None = None) -> None:
        self._config = config
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._last: LiveStatus | None = None
        self._last_line_s = 0.0
        self._width = 0

    def __call__(self, status: LiveStatus) -> None:
        """Show `status`; the rate is measured since the previous call."""
        line = self.line(status)
        self._last = status
        if self._tty:
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self._stream.write("\r" + line + " " * pad)
        elif status.elapsed_s - self._last_line_s >= LINE_EVERY_S:
            self._last_line_s = status.elapsed_s
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End the line on a terminal so that what follows starts on its own."""
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()

    def line(self, status: LiveStatus) -> str:
        """The text shown for `status`."""
        c = self._config
        done = status.ok + status.errors
        previous, since = 0, 0.0
        if self._last is not None:
            previous, since = self._last.ok + self._last.errors, self._last.elapsed_s
        rate = (done - previous) / (status.elapsed_s - since) if status.elapsed_s > since else 0.0
        if status.elapsed_s < c.warmup_s:
            head = f"warm-up {status.elapsed_s:5.1f}/{c.warmup_s:g}s"
        else:
            head = self._bar(status)
        tail = (
            f"{done} done, {rate:7.1f} req/s | errors {status.errors}"
            f" | in flight {status.in_flight}"
        )
        if status.dropped:
            tail += f" | dropped {status.dropped}"
        return f"{head} | {tail}"

    def _bar(self, status: LiveStatus) -> str:
        c = self._config
        measured_s = status.elapsed_s - c.warmup_s
        fractions = []
        if c.duration_s is not None:
            fractions.append(measured_s / c.duration_s)
        if c.requests is not None:
            fractions.append(status.measured_sent / c.requests)
        fraction = min(1.0, max(fractions))
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        where = (
            f"{measured_s:5.1f}/{c.duration_s:g}s"
            if c.duration_s is not None
            else f"{status.measured_sent}/{c.requests}"
        )
        return f"[{bar}] {fraction:4.0%} {where}"
