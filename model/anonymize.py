"""Anonymization: entity spans of a text replaced by placeholders or pseudonyms.

Pure string work on spans that a token-classification head found (model/entities.py);
no numpy, so the gateway may import it too. Offsets are code points (Python `str`
indices), in the input for `start`/`end` and in the output for `output_start`/
`output_end`, so `result.text[s.output_start:s.output_end]` is each replacement.

Spans may come in any order and may overlap: overlapping spans are replaced as one (the
union of their extents, labelled as the one starting first, the longest on a tie), so no
character of a selected entity survives. Adjacent spans stay two replacements.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Style(StrEnum):
    """How an entity is replaced (the `style` param of an anonymize job in Redis)."""

    PLACEHOLDER = "placeholder"  # "[PER]"
    PSEUDONYM = "pseudonym"  # "PER_1", numbered per request


DEFAULT_LABELS: Final = ("PER", "ORG", "LOC")

# (label, surface text) -> what replaces it
Replacer = Callable[[str, str], str]


@dataclass(frozen=True)
class Span:
    """An entity to replace: its label and code-point extent in the input text."""

    label: str
    start: int
    end: int


@dataclass(frozen=True)
class Replaced:
    """One replacement: where it was in the input and where its replacement is in the output."""

    label: str
    start: int
    end: int
    output_start: int
    output_end: int


@dataclass(frozen=True)
class Anonymized:
    """A text with its entities replaced, and the replacements in order."""

    text: str
    spans: tuple[Replaced, ...]


def placeholder(label: str, _surface: str) -> str:
    """The label in brackets, "[PER]": every entity of a label reads the same."""
    return f"[{label}]"


class Pseudonyms:
    """Numbered labels, "PER_1", "PER_2": one per distinct (label, surface text), counted
    per label in the order they are first asked for. Share one across a request's texts."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, str], str] = {}
        self._counts: dict[str, int] = {}

    def __call__(self, label: str, surface: str) -> str:
        key = (label, surface)
        name = self._names.get(key)
        if name is None:
            self._counts[label] = number = self._counts.get(label, 0) + 1
            name = self._names[key] = f"{label}_{number}"
        return name


def replacer(style: Style) -> Replacer:
    """A fresh replacer of `style`, for one request."""
    return Pseudonyms() if style == Style.PSEUDONYM else placeholder


def anonymize(
    text: str, spans: Iterable[Span], labels: Collection[str], replace: Replacer
) -> Anonymized:
    """`text` with the spans whose label is in `labels` replaced; ValueError for a span
    outside the text or empty."""
    kept = sorted(
        (s for s in spans if _checked(s, len(text)).label in labels),
        key=lambda s: (s.start, -s.end),
    )
    pieces: list[str] = []
    replaced: list[Replaced] = []
    position = output = 0
    for span in _merged(kept):
        pieces.append(text[position : span.start])
        output += span.start - position
        replacement = replace(span.label, text[span.start : span.end])
        pieces.append(replacement)
        replaced.append(
            Replaced(span.label, span.start, span.end, output, output + len(replacement))
        )
        output += len(replacement)
        position = span.end
    pieces.append(text[position:])
    return Anonymized("".join(pieces), tuple(replaced))


def _merged(spans: list[Span]) -> list[Span]:
    """Sorted spans with overlapping ones joined; the first one's label wins."""
    merged: list[Span] = []
    for span in spans:
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(last.label, last.start, max(last.end, span.end))
        else:
            merged.append(span)
    return merged


def _checked(span: Span, length: int) -> Span:
    if not 0 <= span.start < span.end <= length:
        raise ValueError(f"span [{span.start}, {span.end}) is empty or outside a text of {length}")
    return span
