"""Validation of a freshly trained branch: each head's figure on its validation rows, and
the intent head's out-of-scope threshold, chosen there (the held-out rows are never read).

Features come from the torch branch in eval mode and go through the serving arithmetic
(`recipe.class_probs` on L2-normalised pooled vectors, `entities_train.score_entities` on
raw token states), so a figure here is what the worker would answer for the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from taskmux_api.kinds import HeadKind

from model.encoder import Floats, l2_normalize
from taskmux.modelrepo.entities_train import score_entities
from taskmux.modelrepo.fit import Params
from taskmux.modelrepo.multitask_data import Task, TaskRows
from taskmux.modelrepo.recipe import class_probs, hit_rate, served_labels

if TYPE_CHECKING:
    from taskmux.modelrepo.multitask import Net

THRESHOLDS = tuple(round(0.01 * k, 2) for k in range(100))  # 0.00 .. 0.99
MAX_INSCOPE_DROP = 0.01  # in-scope accuracy the threshold may cost (as the frozen head)
EVAL_BATCH = 64


@dataclass(frozen=True)
class Validation:
    """A head's validation figures, and its threshold (intent only; 0 for the others)."""

    metrics: dict[str, float]
    threshold: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def branch_outputs(net: Net, rows: TaskRows) -> tuple[Floats, list[Floats]]:
    """Pooled vectors [rows, dim] and raw token states (one [tokens, dim] per row)."""
    from taskmux.modelrepo.multitask import collate

    pooled: list[Floats] = []
    states: list[Floats] = []
    net.eval()
    with torch.no_grad():
        for start in range(0, len(rows), EVAL_BATCH):
            encodings = rows.encodings[start : start + EVAL_BATCH]
            batch = collate(encodings)
            hidden = net.trunk(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            tokens, vectors = net.branch(hidden, batch["attention_mask"])
            pooled.append(vectors.numpy())
            states += [tokens[k, : len(e.ids)].numpy() for k, e in enumerate(encodings)]
    return np.concatenate(pooled).astype(np.float32), states


def pick_threshold(
    probs: Floats, labels: Sequence[str], gold: Sequence[str], fallback: str
) -> tuple[float, dict[str, float]]:
    """The highest threshold whose in-scope accuracy is within MAX_INSCOPE_DROP of none."""
    inscope = [k for k, g in enumerate(gold) if g != fallback]
    out = [k for k, g in enumerate(gold) if g == fallback]

    def scores(threshold: float) -> dict[str, float]:
        answers = served_labels(probs, labels, threshold=threshold, fallback=fallback)
        return {
            "inscope_accuracy": hit_rate([answers[k] for k in inscope], [gold[k] for k in inscope]),
            "oos_recall": hit_rate([answers[k] for k in out], [fallback] * len(out)),
        }

    base = scores(0.0)["inscope_accuracy"]
    best = 0.0
    for threshold in THRESHOLDS:
        if scores(threshold)["inscope_accuracy"] >= base - MAX_INSCOPE_DROP - 1e-9:
            best = threshold
    return best, {**scores(best), "inscope_accuracy_without_threshold": base}


def validate_task(net: Net, task: Task, params: Params | None = None) -> Validation:
    """One head's validation figures through the serving arithmetic (`params`: another
    head on the same branch instead of the net's own)."""
    from taskmux.modelrepo.multitask import head_params

    outputs = branch_outputs(net, task.val)
    return score_head(task, outputs, head_params(net, task.name) if params is None else params)


def score_head(task: Task, outputs: tuple[Floats, list[Floats]], params: Params) -> Validation:
    """A head's validation figures on the branch outputs of the task's validation rows."""
    pooled, states = outputs
    if task.kind == HeadKind.TOKEN_CLASSIFICATION:
        assert task.val_sentences is not None
        scores = score_entities(
            task.val_sentences, list(zip(states, task.val.encodings, strict=True)), params,
            task.labels,
        )  # fmt: skip
        return Validation({"validation_f1": scores.f1, "validation_sentences": scores.sentences})
    probs = class_probs(l2_normalize(pooled), params)
    gold = [task.labels[int(y)] for y in task.val.targets]  # type: ignore[arg-type]
    if task.fallback_label:
        threshold, figures = pick_threshold(probs, task.labels, gold, task.fallback_label)
        metrics = {f"validation_{k}": v for k, v in figures.items()}
        return Validation({**metrics, "validation_examples": len(gold)}, threshold)
    accuracy = hit_rate(served_labels(probs, task.labels), gold)
    return Validation({"validation_accuracy": accuracy, "validation_examples": len(gold)})


def validate(net: Net, tasks: Sequence[Task], emit: Callable[[str], None]) -> dict[str, Validation]:
    """Every head's validation figures, printed as they come."""
    results: dict[str, Validation] = {}
    for task in tasks:
        results[task.name] = validate_task(net, task)
        figures = " ".join(f"{k}={v:.4f}" for k, v in results[task.name].metrics.items())
        emit(f"validation {task.name}: {figures} threshold={results[task.name].threshold}")
    return results


# The figure of each head that its floor is on (intent: in scope, at its threshold).
MAIN_FIGURE = {
    "sentiment": "validation_accuracy",
    "intent": "validation_inscope_accuracy",
    "topic": "validation_accuracy",
    "entities": "validation_f1",
}


def main_figure(name: str, validation: Validation) -> str:
    """The figure that ranks epochs for a head (a user's head: its accuracy or F1)."""
    if name in MAIN_FIGURE:
        return MAIN_FIGURE[name]
    return "validation_f1" if "validation_f1" in validation.metrics else "validation_accuracy"


def overall(results: dict[str, Validation]) -> float:
    """The mean of each head's main validation figure (intent's out-of-scope recall
    counted beside its in-scope accuracy): what picks the epoch that is kept."""
    figures = [v.metrics[main_figure(name, v)] for name, v in results.items()]
    if "intent" in results:
        figures.append(results["intent"].metrics["validation_oos_recall"])
    return float(np.mean(figures))
