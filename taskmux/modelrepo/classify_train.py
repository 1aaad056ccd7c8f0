"""Pieces shared by the sentence-classification trainers: splits, model choice, serving maths.

Held-out rule: `split_distinct` holds out a seeded fraction of the *distinct* texts, and any
other row with the text of a held-out row leaves training too, so a duplicate never puts a
held-out text into the fitted data. Hyperparameters are chosen on a second such split of
the training rows alone (`choose`); held-out rows take part in no choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.heads_math import mlp_logits, softmax
from taskmux.modelrepo.datasets import TrainingDataError
from taskmux.modelrepo.fit import FitOptions, Floats, Ints, Params, accuracy_of, fit_head

log = logging.getLogger(__name__)

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class DistinctSplit:
    """Row indices to fit on and to score on; `dropped` rows duplicated a held-out text."""

    train: list[int]
    heldout: list[int]
    dropped: int


def split_distinct(
    keys: Sequence[str],
    *,
    fraction: float = HELDOUT_FRACTION,
    seed: int = SPLIT_SEED,
    among: Sequence[int] | None = None,
) -> DistinctSplit:
    """Hold out `fraction` of the distinct keys among rows `among` (default: all rows)."""
    pool = list(range(len(keys))) if among is None else list(among)
    first: dict[str, int] = {}
    for i in pool:
        first.setdefault(keys[i], i)
    distinct = sorted(first.values())
    count = max(1, round(fraction * len(distinct)))
    if count >= len(distinct):
        raise TrainingDataError(
            f"cannot hold out {fraction:.0%} of {len(distinct)} distinct texts and train on "
            "the rest; add rows"
        )
    rng = np.random.default_rng(seed)
    heldout = sorted(int(i) for i in rng.choice(distinct, size=count, replace=False))
    held_keys = {keys[i] for i in heldout}
    train = [i for i in pool if keys[i] not in held_keys]
    return DistinctSplit(train, heldout, len(pool) - len(train) - len(heldout))


def encode_labels(labels: Sequence[str], names: Sequence[str]) -> Ints:
    """Label strings as indices into `names`."""
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[label] for label in labels], dtype=np.int64)


@dataclass(frozen=True)
class Choice:
    """The chosen hyperparameters and their validation accuracy."""

    options: FitOptions
    accuracy: float
    examples: int


def choose(
    x: Floats,
    y: Ints,
    num_classes: int,
    candidates: Sequence[FitOptions],
    fit_rows: Sequence[int],
    val_rows: Sequence[int],
) -> Choice:
    """The candidate with the best accuracy on `val_rows` when fitted on `fit_rows`."""
    fit, val = np.asarray(fit_rows), np.asarray(val_rows)
    best: Choice | None = None
    for options in candidates:
        params = fit_head(x[fit], y[fit], num_classes, options)
        score = accuracy_of(x[val], y[val], params)
        log.info("validation: %s accuracy=%.4f", options, score)
        if best is None or score > best.accuracy:
            best = Choice(options, score, len(val))
    if best is None:
        raise ValueError("no candidate options to choose from")
    return best


def class_probs(vectors: Floats, params: Params) -> Floats:
    """What a classification head serves: softmax(mlp_logits(normalised vectors))."""
    return softmax(mlp_logits(vectors, params))


def served_labels(
    probs: Floats, labels: Sequence[str], *, threshold: float = 0.0, fallback: str = ""
) -> list[str]:
    """Each row's answer: the top label, or `fallback` when its probability is below
    `threshold` (as the worker applies a head's threshold)."""
    top = probs.argmax(axis=1)
    confident = probs.max(axis=1) >= threshold
    return [
        labels[int(k)] if ok or not fallback else fallback
        for k, ok in zip(top, confident, strict=True)
    ]


def hit_rate(predicted: Sequence[str], gold: Sequence[str]) -> float:
    """Share of equal pairs (NaN for none)."""
    if not gold:
        return float("nan")
    return float(np.mean([p == g for p, g in zip(predicted, gold, strict=True)]))
