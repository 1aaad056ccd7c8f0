"""The training recipe of the sentence-classification heads, written once; data sets add hooks.

Every head is made the same way:

1. A data set's `load` hook reads it from the data folder and splits it with the run's seed
   (`SPLIT_SEED` unless told otherwise): the rows the head is fitted on, and an inner split of
   those rows alone (fit / validation) on which the candidates are compared.
2. The texts go through the frozen encoder once (`Embedder.sentence_vectors`).
3. Each candidate setting is fitted on the inner fit rows and scored on the validation rows;
   the best one is fitted on all training rows (`fit_and_score`).
4. The data set's `report` hook scores the held-out part, which took part in no choice, and
   names any extra field of the record (intent's threshold).
5. The record (`headstore.head_record`) and the weights are written (`train_shipped`), or
   added to a repository as a new version (`custom.py`).

Held-out rule for `split_distinct`: a seeded fraction of the *distinct* texts is held out,
and any other row with the text of a held-out row leaves training too, so a duplicate never
puts a held-out text into the fitted data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
from taskmux_api.kinds import HeadKind

from model.heads_math import mlp_logits, softmax
from taskmux.modelrepo.build import TRAINED_HEADS_DIR
from taskmux.modelrepo.datasets import TrainingDataError
from taskmux.modelrepo.embedding import Embedder
from taskmux.modelrepo.fit import FitOptions, Floats, Ints, Params, accuracy_of, fit_head
from taskmux.modelrepo.headstore import head_record, write_trained_head

log = logging.getLogger(__name__)

SPLIT_SEED = 0  # every held-out split of every head; a head's record names it
HELDOUT_FRACTION = 0.1

D = TypeVar("D")
Mask = npt.NDArray[np.bool_]
Embed = Callable[[Sequence[str]], Floats]


# --- splits and labels -------------------------------------------------------------------


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


# --- what a data set declares ------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One setting to compare: how to fit, and the weight of the rows a data set prefers."""

    options: FitOptions
    preferred_weight: float = 1.0


@dataclass(frozen=True)
class Examples(Generic[D]):
    """A data set read and split: the texts to embed, their label ids, and each row's role.

    `detail` is whatever the data set's own report hook needs besides (its held-out rows).
    """

    labels: tuple[str, ...]
    texts: list[str]
    y: Ints
    fit: list[int]  # the rows the head is fitted on
    inner_fit: list[int]  # candidates are fitted on these (a part of `fit`) ...
    inner_val: list[int]  # ... and compared on these (another part of `fit`)
    detail: D
    preferred: Mask | None = None  # rows weighted by `Candidate.preferred_weight`

    def weights(self, candidate: Candidate, rows: Sequence[int]) -> Floats | None:
        """Sample weights of `rows` under `candidate` (None: all rows count alike)."""
        if self.preferred is None:
            return None
        weights: Floats = np.where(self.preferred[rows], candidate.preferred_weight, 1.0)
        return weights


@dataclass(frozen=True)
class Choice:
    """The chosen candidate and its validation accuracy (NaN when there was nothing to
    choose between)."""

    candidate: Candidate
    accuracy: float
    examples: int

    @property
    def options(self) -> FitOptions:
        """The chosen fit options."""
        return self.candidate.options


@dataclass(frozen=True)
class Fitted:
    """What the recipe hands a data set's report hook."""

    x: Floats  # the vectors of `Examples.texts`
    choice: Choice
    params: Params  # the head that is written
    embed: Embed  # for held-out texts that a data set keeps apart from its examples


@dataclass(frozen=True)
class Report:
    """A report hook's answer: the metrics (in the order the record lists them) and, for a
    head that rejects unsure answers, its threshold and fallback label."""

    metrics: dict[str, float]
    threshold: float = 0.0
    fallback_label: str = ""


Reporter = Callable[[Examples[D], Fitted], Report]


@dataclass(frozen=True)
class Dataset(Generic[D]):
    """A shipped classification head: where its data comes from and how it is judged."""

    name: str
    load: Callable[[Path, int], Examples[D]]  # (data folder, seed): read and split
    candidates: tuple[Candidate, ...]
    report: Reporter[D]
    describe: Callable[[Choice, int], str]  # (choice, seed): the record's description
    # The sentiment record has always written its counts as integers, the others as floats;
    # kept so that a retrain reproduces the committed head.json byte for byte.
    integer_counts: bool = False


# --- the recipe --------------------------------------------------------------------------


def choose(x: Floats, examples: Examples[Any], candidates: Sequence[Candidate]) -> Choice:
    """The candidate with the best accuracy on the inner validation rows when fitted on the
    inner fit rows (the first of equals); a single candidate is taken as it is."""
    if len(candidates) == 1:
        return Choice(candidates[0], math.nan, 0)
    fit, val = np.asarray(examples.inner_fit), np.asarray(examples.inner_val)
    best: Choice | None = None
    for candidate in candidates:
        params = fit_head(
            x[fit], examples.y[fit], len(examples.labels), candidate.options,
            sample_weight=examples.weights(candidate, examples.inner_fit),
        )  # fmt: skip
        score = accuracy_of(x[val], examples.y[val], params)
        log.info("validation: %s accuracy=%.4f", candidate, score)
        if best is None or score > best.accuracy:
            best = Choice(candidate, score, len(val))
    if best is None:
        raise ValueError("no candidate options to choose from")
    return best


def fit_and_score(
    examples: Examples[D],
    candidates: Sequence[Candidate],
    report: Reporter[D],
    embed: Embed,
    seed: int,
) -> tuple[Fitted, Report]:
    """Embed, choose a candidate, fit it on the training rows, and report (steps 2 to 4)."""
    x = embed(examples.texts)
    # One seed drives the fits as well as the splits, so a run is reproduced from it alone.
    seeded = [replace(c, options=replace(c.options, seed=seed)) for c in candidates]
    choice = choose(x, examples, seeded)
    fit = np.asarray(examples.fit)
    params = fit_head(
        x[fit], examples.y[fit], len(examples.labels), choice.options,
        sample_weight=examples.weights(choice.candidate, examples.fit),
    )  # fmt: skip
    fitted = Fitted(x, choice, params, embed)
    return fitted, report(examples, fitted)


def train_shipped(
    dataset: Dataset[D],
    repo: Path,
    data_dir: Path,
    *,
    out_dir: Path | None = None,
    seed: int = SPLIT_SEED,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fit `dataset`'s head on `repo`'s encoder, write it to `out_dir` (default: its folder
    in `trained/`, where `taskmux model build` picks it up), and report."""
    out_dir = TRAINED_HEADS_DIR / dataset.name if out_dir is None else out_dir
    examples = dataset.load(data_dir, seed)
    embedder = Embedder(repo, cache_dir=cache_dir)
    fitted, report = fit_and_score(
        examples, dataset.candidates, dataset.report, embedder.sentence_vectors, seed
    )
    metrics = rounded(report.metrics, integer_counts=dataset.integer_counts)
    record = head_record(
        dataset.name, HeadKind.CLASSIFICATION, examples.labels, metrics,
        dataset.describe(fitted.choice, seed),
        threshold=report.threshold, fallback_label=report.fallback_label,
    )  # fmt: skip
    write_trained_head(out_dir, record, fitted.params)
    log.info("%s head written to %s", dataset.name, out_dir)
    return {"head_dir": str(out_dir), "metrics": metrics}


def rounded(metrics: Mapping[str, float], *, integer_counts: bool = False) -> dict[str, float]:
    """Metrics at four decimals, as floats (integers stay integers with `integer_counts`)."""
    if integer_counts:
        return {k: round(v, 4) for k, v in metrics.items()}
    return {k: round(float(v), 4) for k, v in metrics.items()}


def heldout_accuracy(examples: Examples[Any], fitted: Fitted, rows: Sequence[int]) -> float:
    """Accuracy of what the fitted head would serve for `rows` of the examples."""
    predicted = served_labels(class_probs(fitted.x[rows], fitted.params), examples.labels)
    return hit_rate(predicted, [examples.labels[k] for k in examples.y[rows]])


# --- what a worker serves ----------------------------------------------------------------


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
