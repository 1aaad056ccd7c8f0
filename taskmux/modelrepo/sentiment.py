"""The sentiment head: SST-2, with a held-out split that no training phrase leaks into.

`SENTIMENT` declares the head for the training recipe (`recipe.py`), which writes it to
`trained/sentiment/`, where `taskmux model build` picks it up; `sentiment_heldout` gives
`taskmux model eval` the same held-out sentences.

Held-out rule for SST-2, whose `train.tsv` mixes whole sentences with their sub-phrases:

- Texts are whitespace-normalised (runs of blanks become one space, ends are stripped).
- A row is a *whole sentence* when its text is not a proper, word-aligned span of any other
  row of `train.tsv` or `dev.tsv`. SST phrases are the constituents of parsed sentences, so
  the sentences are exactly the maximal rows (6,885 of the 66,978 distinct texts).
- With a fixed seed, 10% of `train.tsv`'s whole sentences are held out. Every training row
  whose text is a character substring of a held-out sentence or of a `dev.tsv` whole
  sentence is dropped, so no part of a sentence we evaluate on is ever fitted.
- The L2 strength and the weight of whole sentences against phrases are chosen on a second
  such split carved from the training part only; held-out and dev sentences take part in
  no choice. `dev.tsv` is never fitted; its phrases are sub-phrases of training sentences,
  so `dev_accuracy` (all rows) flatters the head, and the sentence figures are the ones
  to quote.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskmux.modelrepo.datasets import LabelledRows, TrainingDataError, normalize_text
from taskmux.modelrepo.fit import FitOptions, Ints, accuracy_of
from taskmux.modelrepo.recipe import (
    HELDOUT_FRACTION,
    SPLIT_SEED,
    Candidate,
    Choice,
    Dataset,
    Examples,
    Fitted,
    Mask,
    Report,
)

log = logging.getLogger(__name__)

SENTIMENT_LABELS = ("negative", "positive")
L2_GRID = (1e-3, 1e-2, 3e-2, 1e-1)  # on standardised features
SENTENCE_WEIGHTS = (1.0, 3.0)  # real traffic is whole sentences; phrases are most rows
# Whole sentences are the rows the recipe's candidates may weigh up.
CANDIDATES = tuple(
    Candidate(FitOptions(l2=l2), preferred_weight=weight)
    for weight in SENTENCE_WEIGHTS
    for l2 in L2_GRID
)
SENTIMENT_FLOOR = 0.80  # held-out whole-sentence accuracy


# --- data and the held-out split ---------------------------------------------------------


@dataclass(frozen=True)
class LabelledTexts:
    """Rows of a labelled TSV: whitespace-normalised texts and integer labels."""

    texts: list[str]
    labels: Ints


@dataclass(frozen=True)
class Split:
    """Row indices: what to fit on, what to evaluate on, and what was dropped as leakage."""

    train: list[int]
    heldout: list[int]
    leaked: list[int]


def read_labelled_tsv(
    path: Path, *, text_column: str = "sentence", num_classes: int = 2
) -> LabelledTexts:
    """Read a `<text>\\t<label>` TSV with a header; raise TrainingDataError if unusable."""
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such file")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise TrainingDataError(f"{path}: empty file")
    header = rows[0]
    missing = [c for c in (text_column, "label") if c not in header]
    if missing:
        raise TrainingDataError(f"{path}: header {header} lacks column(s) {missing}")
    text_at, label_at = header.index(text_column), header.index("label")
    texts: list[str] = []
    labels: list[int] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise TrainingDataError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
        text, label = normalize_text(row[text_at]), row[label_at].strip()
        if not text:
            raise TrainingDataError(f"{path}:{line}: empty text")
        if label not in {str(k) for k in range(num_classes)}:
            raise TrainingDataError(
                f"{path}:{line}: label {label!r} is not in 0..{num_classes - 1}"
            )
        texts.append(text)
        labels.append(int(label))
    if not texts:
        raise TrainingDataError(f"{path}: no data rows")
    present = sorted(set(labels))
    if len(present) < 2:
        raise TrainingDataError(f"{path}: every row has label {present[0]}; need two labels")
    return LabelledTexts(texts, np.asarray(labels, dtype=np.int64))


def whole_sentence_mask(texts: Sequence[str], context: Sequence[str] = ()) -> Mask:
    """True for each text that is not a proper word-aligned span of any text or context row."""
    rows = {normalize_text(t) for t in [*texts, *context]}
    spans: set[str] = set()
    for row in rows:
        words = row.split()
        n = len(words)
        for start in range(n):
            for end in range(start + 1, n + 1 if start else n):
                span = " ".join(words[start:end])
                if span in rows:
                    spans.add(span)
    return np.asarray([normalize_text(t) not in spans for t in texts], dtype=np.bool_)


def split_heldout(
    texts: Sequence[str],
    is_sentence: Mask,
    *,
    fraction: float = HELDOUT_FRACTION,
    seed: int = SPLIT_SEED,
    protect: Sequence[str] = (),
) -> Split:
    """Hold out `fraction` of the whole sentences; drop training rows that leak into them.

    A row leaks when its text is a character substring of a held-out sentence or of a
    `protect` text (sentences evaluated elsewhere, which must stay unseen too). Texts are
    expected whitespace-normalised, as `read_labelled_tsv` returns them.
    """
    if len(is_sentence) != len(texts):
        raise ValueError(f"{len(is_sentence)} sentence flags for {len(texts)} texts")
    candidates = np.flatnonzero(is_sentence)
    count = round(fraction * len(candidates))
    if count < 1 or count >= len(candidates):
        raise TrainingDataError(
            f"cannot hold out {fraction:.0%} of {len(candidates)} whole sentences"
        )
    rng = np.random.default_rng(seed)
    heldout = sorted(int(i) for i in rng.choice(candidates, size=count, replace=False))
    haystack = "\n".join([*(texts[i] for i in heldout), *protect])
    held = set(heldout)
    train: list[int] = []
    leaked: list[int] = []
    for i, text in enumerate(texts):
        if i in held:
            continue
        (leaked if text in haystack else train).append(i)
    return Split(train=train, heldout=heldout, leaked=leaked)


@dataclass(frozen=True)
class SentimentSplit:
    """The SST-2 split: rows of train.tsv, plus which rows of each file are whole sentences."""

    split: Split
    train_sentences: Mask
    dev_sentences: Mask


def sentiment_split(
    train: LabelledTexts, dev: LabelledTexts, *, seed: int = SPLIT_SEED
) -> SentimentSplit:
    """The SST-2 split described in the module docstring."""
    is_sentence = whole_sentence_mask([*train.texts, *dev.texts])
    train_sentences, dev_sentences = (
        is_sentence[: len(train.texts)],
        is_sentence[len(train.texts) :],
    )
    protect = [dev.texts[i] for i in np.flatnonzero(dev_sentences)]
    split = split_heldout(train.texts, train_sentences, seed=seed, protect=protect)
    if len(set(train.labels[split.train].tolist())) < 2:
        raise TrainingDataError("after the held-out split, the training rows have one label")
    return SentimentSplit(split, train_sentences, dev_sentences)


# --- the sentiment head ------------------------------------------------------------------


def sentiment_heldout(data_dir: Path, *, seed: int = SPLIT_SEED) -> LabelledRows:
    """The held-out whole sentences of SST-2 train.tsv, labelled negative/positive."""
    train, dev = _read(data_dir)
    held = sentiment_split(train, dev, seed=seed).split.heldout
    return LabelledRows(
        [train.texts[i] for i in held], [SENTIMENT_LABELS[train.labels[i]] for i in held]
    )


@dataclass(frozen=True)
class SentimentDetail:
    """The split, and where dev.tsv's rows start among the examples (after train.tsv's)."""

    plan: SentimentSplit
    dev_start: int


def _read(data_dir: Path) -> tuple[LabelledTexts, LabelledTexts]:
    return (
        read_labelled_tsv(data_dir / "sst2" / "train.tsv"),
        read_labelled_tsv(data_dir / "sst2" / "dev.tsv"),
    )


def _load(data_dir: Path, seed: int) -> Examples[SentimentDetail]:
    train, dev = _read(data_dir)
    plan = sentiment_split(train, dev, seed=seed)
    split = plan.split
    log.info(
        "SST-2: %d training rows, %d held-out sentences, %d leaked rows dropped",
        len(split.train), len(split.heldout), len(split.leaked),
    )  # fmt: skip
    fit_texts = [train.texts[i] for i in split.train]
    inner = split_heldout(fit_texts, plan.train_sentences[split.train], seed=seed + 1)
    return Examples(
        SENTIMENT_LABELS,
        [*train.texts, *dev.texts],
        np.concatenate([train.labels, dev.labels]),
        fit=split.train,
        inner_fit=[split.train[i] for i in inner.train],
        inner_val=[split.train[i] for i in inner.heldout],
        detail=SentimentDetail(plan, len(train.texts)),
        preferred=np.concatenate([plan.train_sentences, plan.dev_sentences]),
    )


def _report(examples: Examples[SentimentDetail], fitted: Fitted) -> Report:
    x, y, params = fitted.x, examples.y, fitted.params
    plan, start = examples.detail.plan, examples.detail.dev_start
    held = plan.split.heldout
    dev = np.arange(start, len(examples.texts))
    dev_sentences = start + np.flatnonzero(plan.dev_sentences)
    choice = fitted.choice
    return Report({
        "heldout_accuracy": accuracy_of(x[held], y[held], params),
        "heldout_examples": len(held),
        "dev_sentence_accuracy": accuracy_of(x[dev_sentences], y[dev_sentences], params),
        "dev_sentence_examples": len(dev_sentences),
        "dev_accuracy": accuracy_of(x[dev], y[dev], params),
        "dev_examples": len(dev),
        "train_examples": len(examples.fit),
        "leaked_rows_dropped": len(plan.split.leaked),
        "validation_accuracy": choice.accuracy,
        "validation_examples": choice.examples,
        "l2": choice.options.l2,
        "sentence_weight": choice.candidate.preferred_weight,
    })  # fmt: skip


def _describe(choice: Choice, seed: int) -> str:
    return (
        "Binary sentiment (negative/positive) of English text: softmax regression on "
        "L2-normalised all-MiniLM-L6-v2 vectors, fitted on SST-2 train.tsv; heldout_accuracy "
        f"is on a seed-{seed} 10% of its whole sentences (rows that are no word-aligned "
        "span of another row), and every train row that is a substring of a held-out or "
        "dev.tsv sentence was removed from training."
    )


SENTIMENT = Dataset("sentiment", _load, CANDIDATES, _report, _describe, integer_counts=True)
