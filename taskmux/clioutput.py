"""How the task commands print results: JSONL, one JSON document, or a table; and the
progress bar they draw on a terminal's stderr."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

OUTPUT_FORMATS = ("jsonl", "json", "table")
TEXT_WIDTH = 60
BAR_WIDTH = 24
REDRAW_EVERY_S = 0.1

Record = dict[str, Any]  # one input text's result: {"index": i, "text": ..., ...}


@dataclass(frozen=True)
class BatchResult:
    """One request's results: a record per text, and what the server answered."""

    records: list[Record]
    responses: list[Any]  # the response messages (Analyze: every streamed result)


@dataclass(frozen=True)
class Column:
    """A table column: its header, width, and the cell it shows for a record."""

    header: str
    width: int
    cell: Callable[[Record], str]


class Output(Protocol):
    def batch(self, result: BatchResult) -> None: ...

    def finish(self) -> None: ...


class JsonlOutput:
    """One line per text as each batch arrives, flushed, so a pipe sees them at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def batch(self, result: BatchResult) -> None:
        for record in result.records:
            self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()

    def finish(self) -> None:
        pass


@dataclass
class JsonOutput:
    """One JSON document at the end, made by the command's `merge` of every batch."""

    stream: TextIO
    merge: Callable[[list[BatchResult]], Any]
    results: list[BatchResult] = field(default_factory=list)

    def batch(self, result: BatchResult) -> None:
        self.results.append(result)

    def finish(self) -> None:
        document = self.merge(self.results)
        self.stream.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


class TableOutput:
    """Fixed-width columns, the text last and shortened, printed as batches arrive."""

    def __init__(self, stream: TextIO, columns: Sequence[Column]) -> None:
        self._stream = stream
        self._columns = (Column("index", 6, lambda r: str(r["index"])), *columns)
        self._stream.write(self._row([c.header for c in self._columns], "text") + "\n")

    def batch(self, result: BatchResult) -> None:
        for record in result.records:
            cells = [c.cell(record) for c in self._columns]
            self._stream.write(self._row(cells, shorten(record["text"], TEXT_WIDTH)) + "\n")
        self._stream.flush()

    def finish(self) -> None:
        pass

    def _row(self, cells: Sequence[str], text: str) -> str:
        pairs = zip(cells, self._columns, strict=True)
        padded = [shorten(cell, c.width).ljust(c.width) for cell, c in pairs]
        return "  ".join([*padded, text])


def shorten(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class ProgressBar:
    """Texts done (of the total, when known) and texts/s, redrawn in place on stderr.

    Only on a terminal: piped or redirected, stderr stays clean for the caller's logs.
    """

    def __init__(self, stream: TextIO, total: int | None, *, enabled: bool) -> None:
        self._stream = stream
        self._total = total
        self._enabled = enabled
        self._done = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def advance(self, texts: int) -> None:
        self._done += texts
        now = time.monotonic()
        if self._enabled and now - self._drawn_at >= REDRAW_EVERY_S:
            self._drawn_at = now
            self._stream.write("\r" + self.line(now - self._started))
            self._stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line, so what follows starts on its own."""
        if self._enabled and self._done:
            self._stream.write("\r" + self.line(time.monotonic() - self._started) + "\n")
            self._stream.flush()
        self._enabled = False  # closed: an error line may follow, and no more redraws

    def line(self, elapsed_s: float) -> str:
        rate = self._done / elapsed_s if elapsed_s > 0 else 0.0
        tail = f"{rate:8.1f} texts/s"
        if not self._total:
            return f"{self._done} texts | {tail}"
        fraction = min(1.0, self._done / self._total)
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return f"[{bar}] {fraction:4.0%} {self._done}/{self._total} texts | {tail}"
