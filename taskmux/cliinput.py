"""Where the task commands' texts come from: arguments, a file or stdin, as text or JSONL.

A line is one text. Under `--input-format auto` (the default) a line that is a JSON
object with a string "text" field is that text, and any other line is itself; `jsonl`
insists on the object and `text` never looks inside. Blank lines are skipped, so an
output's `index` counts texts, not lines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

INPUT_FORMATS = ("auto", "text", "jsonl")
STDIN = "-"


class InputError(Exception):
    """Input that cannot be read or parsed; the message is one line naming where."""


@dataclass(frozen=True)
class Batch:
    """Consecutive texts of the input; `start` is the index of the first."""

    start: int
    texts: tuple[str, ...]

    @property
    def span(self) -> str:
        """The batch's texts as the user counts them, e.g. "texts 32-63"."""
        end = self.start + len(self.texts) - 1
        return f"text {self.start}" if end == self.start else f"texts {self.start}-{end}"


def parse_line(line: str, number: int, input_format: str) -> str | None:
    """The text on input line `number` (1-based), or None for a blank line."""
    stripped = line.strip()
    if not stripped:
        return None
    if input_format == "text" or (input_format == "auto" and not stripped.startswith("{")):
        return line.rstrip("\r\n")
    try:
        record = json.loads(stripped)
    except json.JSONDecodeError as err:
        if input_format == "auto":
            return line.rstrip("\r\n")
        raise InputError(f"line {number}: not JSON ({err.msg})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if isinstance(text, str):
        return text
    if input_format == "auto":
        return line.rstrip("\r\n")
    raise InputError(f'line {number}: a JSON object with a string "text" field is needed')


def parse_lines(lines: Iterable[str], input_format: str) -> Iterator[str]:
    """Each non-blank line's text, in order."""
    for number, line in enumerate(lines, start=1):
        text = parse_line(line, number, input_format)
        if text is not None:
            yield text


def batches(texts: Iterable[str], size: int) -> Iterator[Batch]:
    """`texts` cut into batches of `size` (the last may be shorter)."""
    chunk: list[str] = []
    start = 0
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield Batch(start, tuple(chunk))
            start += size
            chunk = []
    if chunk:
        yield Batch(start, tuple(chunk))


@contextmanager
def open_input(source: str | None) -> Iterator[TextIO | None]:
    """The stream `--input` names (stdin for "-"), or None without --input."""
    if source is None:
        yield None
    elif source == STDIN:
        yield sys.stdin
    else:
        with ExitStack() as stack:
            try:
                stream = stack.enter_context(Path(source).open(encoding="utf-8"))
            except OSError as err:
                raise InputError(f"cannot read {source}: {err.strerror}") from None
            yield stream


def read_lines(stream: TextIO, source: str) -> Iterator[str]:
    """The stream's lines; undecodable bytes become an InputError naming the source."""
    try:
        yield from stream
    except UnicodeDecodeError as err:
        raise InputError(f"{source}: not UTF-8 ({err.reason} at byte {err.start})") from None


def count_texts(source: str | None, input_format: str) -> int | None:
    """How many texts a regular file holds (a progress bar's total); None for stdin."""
    if source is None or source == STDIN or not Path(source).is_file():
        return None
    with Path(source).open(encoding="utf-8", errors="replace") as stream:
        if input_format == "text":
            return sum(1 for line in stream if line.strip())
        try:
            return sum(1 for _ in parse_lines(stream, input_format))
        except InputError:
            return None  # reported with its line number when the run reaches it
