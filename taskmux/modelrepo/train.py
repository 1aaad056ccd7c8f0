"""The sentiment head: SST-2, with a held-out split that no training phrase leaks into.

`train_sentiment` fits the head and writes it to `trained/sentiment/`, where
`taskmux model build` picks it up; `sentiment_heldout` gives `taskmux model eval` the same
held-out sentences. The fitters live in `fit.py`, the readers in `datasets.py`.

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
from typing import Any

import numpy as np
import numpy.typing as npt

from taskmux.modelrepo.build import TRAINED_HEADS_DIR
from taskmux.modelrepo.datasets import LabelledRows, TrainingDataError, normalize_text
from taskmux.modelrepo.embedding import Embedder
from taskmux.modelrepo.fit import accuracy, fit_softmax_regression
from taskmux.modelrepo.headstore import write_trained_head

__all__ = [
    "TrainingDataError",
    "accuracy",
    "fit_softmax_regression",
    "read_labelled_tsv",
    "sentiment_heldout",
    "sentiment_split",
    "train_sentiment",
    "whole_sentence_mask",
]

log = logging.getLogger(__name__)

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

SENTIMENT_LABELS = ("negative", "positive")
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.1
L2_GRID = (1e-3, 1e-2, 3e-2, 1e-1)  # on standardised features
SENTENCE_WEIGHTS = (1.0, 3.0)  # real traffic is whole sentences; phrases are most rows
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
    train = read_labelled_tsv(data_dir / "sst2" / "train.tsv")
    dev = read_labelled_tsv(data_dir / "sst2" / "dev.tsv")
    held = sentiment_split(train, dev, seed=seed).split.heldout
    return LabelledRows(
        [train.texts[i] for i in held], [SENTIMENT_LABELS[train.labels[i]] for i in held]
    )


def train_sentiment(
    repo: Path,
    data_dir: Path,
    *,
    out_dir: Path = TRAINED_HEADS_DIR / "sentiment",
    seed: int = SPLIT_SEED,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fit the SST-2 sentiment head on `repo`'s encoder, write it to `out_dir`, report."""
    train = read_labelled_tsv(data_dir / "sst2" / "train.tsv")
    dev = read_labelled_tsv(data_dir / "sst2" / "dev.tsv")
    plan = sentiment_split(train, dev, seed=seed)
    split = plan.split
    log.info(
        "SST-2: %d training rows, %d held-out sentences, %d leaked rows dropped",
        len(split.train), len(split.heldout), len(split.leaked),
    )  # fmt: skip
    embedder = Embedder(repo, cache_dir=cache_dir)
    vectors = embedder.sentence_vectors([*train.texts, *dev.texts])
    x_train, x_dev = vectors[: len(train.texts)], vectors[len(train.texts) :]

    fit = np.asarray(split.train)
    fit_texts = [train.texts[i] for i in split.train]
    choice = _select(x_train[fit], train.labels[fit], fit_texts, plan.train_sentences[fit], seed)
    weight, bias = fit_softmax_regression(
        x_train[fit],
        train.labels[fit],
        len(SENTIMENT_LABELS),
        l2=choice.l2,
        sample_weight=np.where(plan.train_sentences[fit], choice.sentence_weight, 1.0),
        seed=seed,
    )

    held, dev_sentences = np.asarray(split.heldout), plan.dev_sentences
    metrics: dict[str, float] = {
        "heldout_accuracy": accuracy(x_train[held], train.labels[held], weight, bias),
        "heldout_examples": len(held),
        "dev_sentence_accuracy": accuracy(
            x_dev[dev_sentences], dev.labels[dev_sentences], weight, bias
        ),
        "dev_sentence_examples": int(dev_sentences.sum()),
        "dev_accuracy": accuracy(x_dev, dev.labels, weight, bias),
        "dev_examples": len(dev.texts),
        "train_examples": len(fit),
        "leaked_rows_dropped": len(split.leaked),
        "validation_accuracy": choice.accuracy,
        "validation_examples": choice.examples,
        "l2": choice.l2,
        "sentence_weight": choice.sentence_weight,
    }
    metrics = {k: round(v, 4) for k, v in metrics.items()}
    head = {
        "name": "sentiment",
        "kind": "classification",
        "version": "1",
        "labels": list(SENTIMENT_LABELS),
        "metrics": metrics,
        "description": (
            "Binary sentiment (negative/positive) of English text: softmax regression on "
            "L2-normalised all-MiniLM-L6-v2 vectors, fitted on SST-2 train.tsv; heldout_accuracy "
            f"is on a seed-{seed} 10% of its whole sentences (rows that are no word-aligned "
            "span of another row), and every train row that is a substring of a held-out or "
            "dev.tsv sentence was removed from training."
        ),
    }
    write_trained_head(out_dir, head, {"weight": weight, "bias": bias})
    log.info("sentiment head written to %s", out_dir)
    return {"head_dir": str(out_dir), "metrics": metrics}


@dataclass(frozen=True)
class _Choice:
    l2: float
    sentence_weight: float
    accuracy: float
    examples: int


def _select(x: Floats, y: Ints, texts: list[str], is_sentence: Mask, seed: int) -> _Choice:
    """Pick l2 and the weight of whole sentences on a split of the training rows alone."""
    inner = split_heldout(texts, is_sentence, seed=seed + 1)
    fit, val = np.asarray(inner.train), np.asarray(inner.heldout)
    best: _Choice | None = None
    for sentence_weight in SENTENCE_WEIGHTS:
        for l2 in L2_GRID:
            weight, bias = fit_softmax_regression(
                x[fit],
                y[fit],
                len(SENTIMENT_LABELS),
                l2=l2,
                sample_weight=np.where(is_sentence[fit], sentence_weight, 1.0),
                seed=seed,
            )
            score = accuracy(x[val], y[val], weight, bias)
            log.info(
                "validation: l2=%g sentence_weight=%g accuracy=%.4f", l2, sentence_weight, score
            )
            if best is None or score > best.accuracy:
                best = _Choice(l2, sentence_weight, score, len(val))
    assert best is not None
    return best
