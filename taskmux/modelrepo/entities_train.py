"""Token-classification heads: align word tags to word pieces, fit, and score end to end.

Alignment: a sentence's raw text is its words joined by single spaces. Each word piece
belongs to the word its first character falls in. With the `bio` scheme the first piece of
a word gets the word's tag and later pieces get `I-X` when the word is part of an X entity
(`O` otherwise), so a word the tokenizer cuts in several (`U.S.` is `u . s .`) stays one
entity. With the `io` scheme every piece of an X word gets the bare label `X`, and
decoding joins neighbouring words of one type: B/I mistakes can no longer split an entity
(on the shipped data, IO lifts validation F1 from 0.76 to 0.79), at the price of merging
two entities of one type that touch (70 of CoNLL-2003's 23,499). Special tokens get no target.

Scoring is the serving path end to end: raw text, encoder token states,
`model.entities.token_probs`, `decode_entities`, then exact (start, end, type) matches
against the gold spans of the words (micro precision, recall and F1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Encoding

from model.encoder import l2_normalize
from model.entities import decode_entities, token_probs
from taskmux.modelrepo.datasets import TaggedSentence, TrainingDataError
from taskmux.modelrepo.fit import FitOptions, Floats, Ints, Params, fit_head
from taskmux.modelrepo.recipe import HELDOUT_FRACTION, SPLIT_SEED, DistinctSplit, split_distinct

SCHEMES = ("io", "bio")

TokenStates = Callable[[Sequence[str]], list[tuple[Floats, Encoding]]]
Gold = tuple[int, int, str]


def split_sentences(
    sentences: Sequence[TaggedSentence],
    *,
    fraction: float = HELDOUT_FRACTION,
    seed: int = SPLIT_SEED,
    among: Sequence[int] | None = None,
) -> DistinctSplit:
    """Hold out `fraction` of the distinct sentence texts (duplicates leave training)."""
    return split_distinct([s.text for s in sentences], fraction=fraction, seed=seed, among=among)


def word_offsets(words: Sequence[str]) -> list[tuple[int, int]]:
    """Code-point (start, end) of each word in `" ".join(words)`."""
    offsets, at = [], 0
    for word in words:
        offsets.append((at, at + len(word)))
        at += len(word) + 1
    return offsets


def gold_spans(sentence: TaggedSentence) -> set[Gold]:
    """Entity spans of a tagged sentence (a stray I- opens an entity, as in decoding)."""
    spans: set[Gold] = set()
    current: tuple[int, int, str] | None = None
    for (start, end), tag in zip(word_offsets(sentence.words), sentence.tags, strict=True):
        kind = None if tag == "O" else tag[2:]
        if kind is not None and tag.startswith("I-") and current and current[2] == kind:
            current = (current[0], end, kind)
            continue
        if current:
            spans.add(current)
        current = None if kind is None else (start, end, kind)
    if current:
        spans.add(current)
    return spans


def scheme_labels(types: Sequence[str], scheme: str) -> tuple[str, ...]:
    """A token head's labels: `O`, then each type bare (io) or as B-/I- pairs (bio)."""
    if scheme == "io":
        return ("O", *types)
    if scheme == "bio":
        return ("O", *(f"{prefix}-{t}" for t in types for prefix in ("B", "I")))
    raise ValueError(f"unknown tagging scheme {scheme!r}; use one of {SCHEMES}")


def _target(tag: str, continuation: bool, scheme: str) -> str:
    if tag == "O":
        return tag
    if scheme == "io":
        return tag[2:]
    return f"I-{tag[2:]}" if continuation else tag


def token_targets(
    sentence: TaggedSentence, encoding: Encoding, label_index: dict[str, int], scheme: str
) -> list[tuple[int, int]]:
    """(token index, label id) for every non-special token with a target."""
    text = sentence.text
    word_at = np.full(len(text) + 1, -1, dtype=np.int64)
    for w, (start, end) in enumerate(word_offsets(sentence.words)):
        word_at[start:end] = w
    targets: list[tuple[int, int]] = []
    previous = -1
    for k, (start, end) in enumerate(encoding.offsets):
        if encoding.special_tokens_mask[k] or not 0 <= start < end <= len(text):
            continue
        word = int(word_at[start])
        if word < 0:
            continue
        tag = _target(sentence.tags[word], word == previous, scheme)
        targets.append((k, label_index[tag]))
        previous = word
    return targets


def token_dataset(
    sentences: Sequence[TaggedSentence],
    encoded: Sequence[tuple[Floats, Encoding]],
    labels: Sequence[str],
    scheme: str,
) -> tuple[Floats, Ints]:
    """Features (L2-normalised token states, as `token_probs` sees them) and targets."""
    label_index = {label: i for i, label in enumerate(labels)}
    rows: list[Floats] = []
    targets: list[int] = []
    for sentence, (states, encoding) in zip(sentences, encoded, strict=True):
        pairs = token_targets(sentence, encoding, label_index, scheme)
        if pairs:
            rows.append(states[[k for k, _ in pairs]])
            targets.extend(label for _, label in pairs)
    if not rows:
        raise TrainingDataError("no token of the training sentences has a target")
    features = l2_normalize(np.concatenate(rows).astype(np.float32))
    return features, np.asarray(targets, dtype=np.int64)


@dataclass(frozen=True)
class EntityScores:
    """Micro-averaged exact-span scores."""

    precision: float
    recall: float
    f1: float
    gold: int
    predicted: int
    sentences: int
    per_type_f1: dict[str, float]


def score_entities(
    sentences: Sequence[TaggedSentence],
    encoded: Sequence[tuple[Floats, Encoding]],
    params: Params,
    labels: Sequence[str],
) -> EntityScores:
    """Decode each sentence through the serving functions and compare with its gold spans."""
    gold_all: set[tuple[int, int, int, str]] = set()
    predicted_all: set[tuple[int, int, int, str]] = set()
    for n, (sentence, (states, encoding)) in enumerate(zip(sentences, encoded, strict=True)):
        text = sentence.text
        spans = decode_entities(token_probs(states, params), encoding, text, labels)
        if any(text[s.start : s.end] != s.text for s in spans):
            raise AssertionError(f"a decoded span does not slice back to {text!r}")
        gold_all |= {(n, *g) for g in gold_spans(sentence)}
        predicted_all |= {(n, s.start, s.end, s.label) for s in spans}
    types = sorted({g[3] for g in gold_all} | {p[3] for p in predicted_all})
    per_type = {
        t: _f1({g for g in gold_all if g[3] == t}, {p for p in predicted_all if p[3] == t})[2]
        for t in types
    }
    precision, recall, f1 = _f1(gold_all, predicted_all)
    return EntityScores(
        precision, recall, f1, len(gold_all), len(predicted_all), len(sentences), per_type
    )


def _f1(gold: set[Any], predicted: set[Any]) -> tuple[float, float, float]:
    hits = len(gold & predicted)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return precision, recall, f1


def fit_token_head(
    sentences: Sequence[TaggedSentence],
    encoded: Sequence[tuple[Floats, Encoding]],
    labels: Sequence[str],
    scheme: str,
    options: FitOptions,
) -> Params:
    """Fit a token head on the aligned pieces of `sentences`."""
    features, targets = token_dataset(sentences, encoded, labels, scheme)
    present = np.unique(targets)
    if len(present) < 2:
        raise TrainingDataError("the training sentences' pieces all have one label")
    return fit_head(features, targets, len(labels), options)
