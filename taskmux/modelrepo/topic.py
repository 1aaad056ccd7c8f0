"""The topic head: AG News (World, Sports, Business, Sci/Tech), on the raw texts.

Texts are used exactly as in the file, HTML entity debris such as `#39;` included: a worker
sees raw text and cleans nothing, so training does not clean either.

Held-out rule: a seeded 10% of the distinct texts of agnews/train.tsv (rows repeating a
held-out text leave training). The head's form (softmax regression or a small MLP) and its
regularisation are chosen on a second seeded 10% of the training rows alone; the final
head is fitted on all training rows.
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
from taskmux.modelrepo.datasets import LabelledRows, read_agnews
from taskmux.modelrepo.embedding import Embedder
from taskmux.modelrepo.fit import FitOptions, fit_head
from taskmux.modelrepo.headstore import write_trained_head

log = logging.getLogger(__name__)

TOPIC_FLOOR = 0.87  # held-out accuracy
DATA_FILE = Path("agnews") / "train.tsv"
CANDIDATES = (
    FitOptions(l2=1e-2),
    FitOptions(l2=3e-2),
    FitOptions(hidden=256, l2=1e-3, epochs=20, learning_rate=1e-3, dropout=0.5),
    FitOptions(hidden=256, l2=1e-2, epochs=20, learning_rate=1e-3, dropout=0.5),
)


def topic_split(data: LabelledRows, seed: int = SPLIT_SEED) -> tuple[list[int], list[int], int]:
    """(training rows, held-out rows, rows dropped as duplicates of held-out texts)."""
    split = split_distinct(data.texts, seed=seed)
    return split.train, split.heldout, split.dropped


def topic_heldout(data_dir: Path, seed: int = SPLIT_SEED) -> LabelledRows:
    """The held-out AG News rows."""
    data = read_agnews(data_dir / DATA_FILE)
    _, held, _ = topic_split(data, seed)
    return LabelledRows([data.texts[i] for i in held], [data.labels[i] for i in held])


def train_topic(
    repo: Path,
    data_dir: Path,
    *,
    out_dir: Path = TRAINED_HEADS_DIR / "topic",
    seed: int = SPLIT_SEED,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fit the topic head on `repo`'s encoder, write it to `out_dir`, report."""
    data = read_agnews(data_dir / DATA_FILE)
    labels = data.label_set()
    train, held, dropped = topic_split(data, seed)
    x = Embedder(repo, cache_dir=cache_dir).sentence_vectors(data.texts)
    y = encode_labels(data.labels, labels)
    inner = split_distinct(data.texts, seed=seed + 1, among=train)
    choice = choose(x, y, len(labels), CANDIDATES, inner.train, inner.heldout)
    params = fit_head(x[train], y[train], len(labels), choice.options)
    predicted = served_labels(class_probs(x[held], params), labels)
    options = choice.options
    metrics = {
        "heldout_accuracy": hit_rate(predicted, [data.labels[i] for i in held]),
        "heldout_examples": len(held),
        "validation_accuracy": choice.accuracy,
        "validation_examples": choice.examples,
        "train_examples": len(train),
        "rows_dropped_as_heldout_duplicates": dropped,
        "hidden": options.hidden,
        "l2": options.l2,
        "dropout": options.dropout,
    }
    metrics = {k: round(float(v), 4) for k, v in metrics.items()}
    form = (
        f"an MLP (one ReLU layer of {options.hidden})" if options.hidden else "softmax regression"
    )
    head = {
        "name": "topic",
        "kind": "classification",
        "version": "1",
        "labels": list(labels),
        "metrics": metrics,
        "description": (
            f"News topic (World, Sports, Business, Sci/Tech) of English text: {form} on "
            "L2-normalised all-MiniLM-L6-v2 vectors of the raw text, fitted on AG News "
            f"train.tsv; heldout_accuracy is on a seed-{seed} 10% of its distinct texts."
        ),
    }
    write_trained_head(out_dir, head, params)
    log.info("topic head written to %s", out_dir)
    return {"head_dir": str(out_dir), "metrics": metrics}
