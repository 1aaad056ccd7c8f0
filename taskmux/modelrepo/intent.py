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
from dataclasses import dataclass
from pathlib import Path

from taskmux.modelrepo.datasets import LabelledRows, TrainingDataError, read_clinc
from taskmux.modelrepo.fit import FitOptions, Floats, Params, fit_head
from taskmux.modelrepo.recipe import (
    Candidate,
    Choice,
    Dataset,
    Examples,
    Fitted,
    Report,
    class_probs,
    encode_labels,
    hit_rate,
    served_labels,
    split_distinct,
)

log = logging.getLogger(__name__)

OOS = "oos"
INTENT_FLOOR = 0.94  # held-out in-scope accuracy
CANDIDATES = tuple(Candidate(FitOptions(l2=l2)) for l2 in (3e-4, 1e-3, 3e-3))
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


@dataclass(frozen=True)
class IntentDetail:
    """The validation rows by scope (the threshold is picked there), and the held-out files."""

    inscope_val: list[int]
    oos_val: list[int]
    dropped: int  # training rows whose text is in val or oos_val
    heldout: LabelledRows  # val
    heldout_oos: LabelledRows  # oos_val


def _load(data_dir: Path, seed: int) -> Examples[IntentDetail]:
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
    in_rows = [i for i, label in enumerate(y) if labels[label] != OOS]
    oos_rows = [i for i, label in enumerate(y) if labels[label] == OOS]
    inner_in = split_distinct(texts, seed=seed + 1, among=in_rows)
    inner_oos = split_distinct(texts, fraction=0.5, seed=seed + 1, among=oos_rows)
    detail = IntentDetail(
        inner_in.heldout, inner_oos.heldout, dropped, parts["val"], parts["oos_val"]
    )
    return Examples(
        labels, texts, y, fit=list(range(len(texts))),
        inner_fit=inner_in.train + inner_oos.train,
        inner_val=inner_in.heldout + inner_oos.heldout, detail=detail,
    )  # fmt: skip


def _report(examples: Examples[IntentDetail], fitted: Fitted) -> Report:
    detail, labels, x, y = examples.detail, examples.labels, fitted.x, examples.y
    inner = fit_head(
        x[examples.inner_fit], y[examples.inner_fit], len(labels), fitted.choice.options
    )
    threshold, validation = _pick_threshold(
        inner, labels, x[detail.inscope_val], [labels[k] for k in y[detail.inscope_val]],
        x[detail.oos_val],
    )  # fmt: skip
    val, oos_val = detail.heldout, detail.heldout_oos
    heldout = intent_scores(
        fitted.params, labels, threshold, fitted.embed(val.texts), val.labels,
        fitted.embed(oos_val.texts),
    )  # fmt: skip
    metrics = {
        **{f"heldout_{k}": v for k, v in heldout.items()},
        "heldout_inscope_examples": len(val.texts),
        "heldout_oos_examples": len(oos_val.texts),
        **{f"validation_{k}": v for k, v in validation.items()},
        "validation_inscope_examples": len(detail.inscope_val),
        "validation_oos_examples": len(detail.oos_val),
        "train_examples": len(examples.texts),
        "rows_dropped_as_heldout_duplicates": detail.dropped,
        "threshold": threshold,
        "l2": fitted.choice.options.l2,
    }
    return Report(metrics, threshold=threshold, fallback_label=OOS)


def _describe(choice: Choice, seed: int) -> str:
    return (
        "Intent of an English assistant query: 150 CLINC150 intents, or 'oos' (out of "
        "scope) when the top probability is below the threshold. Softmax regression on "
        "L2-normalised all-MiniLM-L6-v2 vectors, fitted on CLINC150 train + oos_train; "
        "heldout_* figures are on val and oos_val, which no choice saw."
    )


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


INTENT = Dataset("intent", _load, CANDIDATES, _report, _describe)
