"""The intent head: CLINC150's 150 intents plus `oos` (out of scope), with a rejection threshold.

Held-out rule: `val` (3,000 in-scope queries) and `oos_val` (100 out-of-scope queries) are
never fitted and take part in no choice; training rows whose text also occurs there (3 in
the shipped data) are dropped. Everything is chosen on an inner split of the training side:
a seeded 10% of `train`'s distinct texts and half of `oos_train`. There the L2 strength is
picked by accuracy, then the threshold: the highest one (so the most out-of-scope queries
caught) that costs in-scope accuracy at most `MAX_INSCOPE_DROP` against no threshold.
The final head is fitted on all of `train` + `oos_train` with those choices.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from taskmux.modelrepo.build import TRAINED_HEADS_DIR
from taskmux.modelrepo.classify_train import (
    SPLIT_SEED,
    choose,
    class_probs,
    encode_labels,
    hit_rate,
    served_labels,
    split_distinct,
)
from taskmux.modelrepo.datasets import LabelledRows, TrainingDataError, read_clinc
from taskmux.modelrepo.embedding import Embedder
from taskmux.modelrepo.fit import FitOptions, Floats, Params, fit_head
from taskmux.modelrepo.headstore import write_trained_head

log = logging.getLogger(__name__)

OOS = "oos"
INTENT_FLOOR = 0.94  # held-out in-scope accuracy
CANDIDATES = tuple(FitOptions(l2=l2) for l2 in (3e-4, 1e-3, 3e-3))
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(19))  # 0.00 .. 0.90
MAX_INSCOPE_DROP = 0.01
DATA_FILE = Path("clinc150") / "clinc150_train_val.json"


def intent_heldout(data_dir: Path) -> tuple[LabelledRows, LabelledRows]:
    """The held-out (in-scope, out-of-scope) queries: CLINC150 `val` and `oos_val`."""
    parts = read_clinc(data_dir / DATA_FILE)
    return parts["val"], parts["oos_val"]


def intent_scores(
    params: Params, labels: tuple[str, ...], threshold: float, inscope_x: Floats,
    inscope: list[str], oos_x: Floats,
) -> dict[str, float]:  # fmt: skip
    """In-scope accuracy without and with the threshold, and out-of-scope recall."""
    p_in, p_oos = class_probs(inscope_x, params), class_probs(oos_x, params)
    plain_oos = served_labels(p_oos, labels)
    at_in = served_labels(p_in, labels, threshold=threshold, fallback=OOS)
    at_oos = served_labels(p_oos, labels, threshold=threshold, fallback=OOS)
    return {
        "inscope_accuracy": hit_rate(served_labels(p_in, labels), inscope),
        "inscope_accuracy_at_threshold": hit_rate(at_in, inscope),
        "oos_recall": hit_rate(plain_oos, [OOS] * len(plain_oos)),
        "oos_recall_at_threshold": hit_rate(at_oos, [OOS] * len(at_oos)),
    }


def train_intent(
    repo: Path,
    data_dir: Path,
    *,
    out_dir: Path = TRAINED_HEADS_DIR / "intent",
    seed: int = SPLIT_SEED,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fit the intent head and its threshold, write it to `out_dir`, report."""
    parts = read_clinc(data_dir / DATA_FILE)
    intents = sorted(set(parts["train"].labels) - {OOS})
    labels = (*intents, OOS)
    unknown = set(parts["val"].labels) - set(intents)
    if unknown:
        raise TrainingDataError(f"val has intents that train lacks: {sorted(unknown)[:5]}")
    held_texts = set(parts["val"].texts) | set(parts["oos_val"].texts)
    rows = [
        (text, label)
        for key in ("train", "oos_train")
        for text, label in zip(parts[key].texts, parts[key].labels, strict=True)
        if text not in held_texts
    ]
    texts, y = [t for t, _ in rows], encode_labels([label for _, label in rows], labels)
    dropped = len(parts["train"].texts) + len(parts["oos_train"].texts) - len(rows)

    embedder = Embedder(repo, cache_dir=cache_dir)
    x = embedder.sentence_vectors(texts)
    in_rows = [i for i, label in enumerate(y) if labels[label] != OOS]
    oos_rows = [i for i, label in enumerate(y) if labels[label] == OOS]
    inner_in = split_distinct(texts, seed=seed + 1, among=in_rows)
    inner_oos = split_distinct(texts, fraction=0.5, seed=seed + 1, among=oos_rows)
    fit_rows, val_rows = inner_in.train + inner_oos.train, inner_in.heldout + inner_oos.heldout
    choice = choose(x, y, len(labels), CANDIDATES, fit_rows, val_rows)
    inner = fit_head(x[fit_rows], y[fit_rows], len(labels), choice.options)
    threshold, validation = _pick_threshold(
        inner, labels, x[inner_in.heldout], [labels[k] for k in y[inner_in.heldout]],
        x[inner_oos.heldout],
    )  # fmt: skip
    params = fit_head(x, y, len(labels), choice.options)

    val, oos_val = intent_heldout(data_dir)
    heldout = intent_scores(
        params, labels, threshold, embedder.sentence_vectors(val.texts), val.labels,
        embedder.sentence_vectors(oos_val.texts),
    )  # fmt: skip
    metrics = {
        **{f"heldout_{k}": v for k, v in heldout.items()},
        "heldout_inscope_examples": len(val.texts),
        "heldout_oos_examples": len(oos_val.texts),
        **{f"validation_{k}": v for k, v in validation.items()},
        "validation_inscope_examples": len(inner_in.heldout),
        "validation_oos_examples": len(inner_oos.heldout),
        "train_examples": len(texts),
        "rows_dropped_as_heldout_duplicates": dropped,
        "threshold": threshold,
        "l2": choice.options.l2,
    }
    metrics = {k: round(float(v), 4) for k, v in metrics.items()}
    head = {
        "name": "intent",
        "kind": "classification",
        "version": "1",
        "labels": list(labels),
        "metrics": metrics,
        "description": (
            "Intent of an English assistant query: 150 CLINC150 intents, or 'oos' (out of "
            "scope) when the top probability is below the threshold. Softmax regression on "
            "L2-normalised all-MiniLM-L6-v2 vectors, fitted on CLINC150 train + oos_train; "
            "heldout_* figures are on val and oos_val, which no choice saw."
        ),
        "threshold": threshold,
        "fallback_label": OOS,
    }
    write_trained_head(out_dir, head, params)
    log.info("intent head written to %s", out_dir)
    return {"head_dir": str(out_dir), "metrics": metrics}


def _pick_threshold(
    params: Params, labels: tuple[str, ...], inscope_x: Floats, inscope: list[str],
    oos_x: Floats,
) -> tuple[float, dict[str, float]]:  # fmt: skip
    """The highest threshold whose in-scope accuracy is within MAX_INSCOPE_DROP of none."""
    base = intent_scores(params, labels, 0.0, inscope_x, inscope, oos_x)["inscope_accuracy"]
    best = 0.0
    for threshold in THRESHOLDS:
        scores = intent_scores(params, labels, threshold, inscope_x, inscope, oos_x)
        log.info("threshold %.2f: %s", threshold, scores)
        if scores["inscope_accuracy_at_threshold"] >= base - MAX_INSCOPE_DROP - 1e-9:
            best = threshold
    return best, intent_scores(params, labels, best, inscope_x, inscope, oos_x)
