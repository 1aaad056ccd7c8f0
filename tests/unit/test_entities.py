"""Entity decoding: spans slice back to the caller's text, whatever the script."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Encoding, Tokenizer

from model.entities import decode_entities
from model.manifest import load_manifest

BIO = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
IO = ("O", "PER", "LOC")


@pytest.fixture(scope="module")
def tokenizer(model_repo: Path) -> Tokenizer:
    tok = Tokenizer.from_file(
        str(model_repo / load_manifest(model_repo, verify=False).encoder.tokenizer_file)
    )
    tok.no_padding()
    return tok


def _probs(
    encoding: Encoding, labels: tuple[str, ...], tags: dict[str, str], text: str
) -> np.ndarray:
    """One-hot probabilities: the word starting at each key's position gets that tag."""
    probs = np.zeros((len(encoding.ids), len(labels)), dtype=np.float32)
    probs[:, 0] = 1.0
    for word, tag in tags.items():
        start = text.index(word)
        for i, (s, e) in enumerate(encoding.offsets):
            if s >= start and e <= start + len(word) and e > s:
                probs[i] = 0.0
                probs[i, labels.index(tag if s == start else tag.replace("B-", "I-"))] = 1.0
    return probs


@pytest.mark.parametrize(
    ("text", "tags", "expected"),
    [
        (
            "Zoë Müller-Lüdenscheidt lives in Zürich.",
            {"Zoë": "B-PER", "Müller": "I-PER", "Zürich": "B-LOC"},
            [("Zoë Müller", "PER"), ("Zürich", "LOC")],
        ),
        (
            "東京 is big 🙂 and Ålesund too",
            {"東": "B-LOC", "京": "I-LOC", "Ålesund": "B-LOC"},
            [("東京", "LOC"), ("Ålesund", "LOC")],
        ),
        ("🙂🙂 Anna met Bob", {"Anna": "B-PER", "Bob": "B-PER"}, [("Anna", "PER"), ("Bob", "PER")]),
        (
            "Paris Berlin",
            {"Paris": "B-LOC", "Berlin": "B-LOC"},
            [("Paris", "LOC"), ("Berlin", "LOC")],
        ),
        ("then Rome fell", {"Rome": "I-LOC"}, [("Rome", "LOC")]),  # a stray I- opens an entity
        ("nothing here", {}, []),
    ],
)
def test_bio_spans_slice_back(
    tokenizer: Tokenizer, text: str, tags: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    encoding = tokenizer.encode(text)
    spans = decode_entities(_probs(encoding, BIO, tags, text), encoding, text, BIO)
    assert [(s.text, s.label) for s in spans] == expected
    for span in spans:
        assert text[span.start : span.end] == span.text
        assert 0.0 <= span.score <= 1.0


def test_io_tags_join_consecutive_words(tokenizer: Tokenizer) -> None:
    text = "Jimi Hendrix played in Seattle"
    encoding = tokenizer.encode(text)
    probs = _probs(encoding, IO, {"Jimi": "PER", "Hendrix": "PER", "Seattle": "LOC"}, text)
    spans = decode_entities(probs, encoding, text, IO)
    assert [(s.text, s.label, s.start, s.end) for s in spans] == [
        ("Jimi Hendrix", "PER", 0, 12),
        ("Seattle", "LOC", 23, 30),
    ]


def test_mismatched_shapes_are_refused(tokenizer: Tokenizer) -> None:
    encoding = tokenizer.encode("a b")
    with pytest.raises(ValueError, match="labels"):
        decode_entities(np.zeros((len(encoding.ids), 2), np.float32), encoding, "a b", BIO)
