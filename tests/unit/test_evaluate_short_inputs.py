"""The card's short-input topic figure cuts each held-out text to its first words."""

from __future__ import annotations

from taskmux.modelrepo.datasets import LabelledRows
from taskmux.modelrepo.evaluate import first_words


def test_first_words_cuts_each_text_and_keeps_its_label() -> None:
    rows = LabelledRows(["one two three four", "  short\ttext ", "x"], ["a", "b", "c"])
    cut = first_words(rows, 2)
    assert cut.texts == ["one two", "short text", "x"]
    assert cut.labels == ["a", "b", "c"]
