"""The topic head: AG News (World, Sports, Business, Sci/Tech), on the raw texts.

Texts are used exactly as in the file, HTML entity debris such as `#39;` included: a worker
sees raw text and cleans nothing, so training does not clean either.

Held-out rule: a seeded 10% of the distinct texts of agnews/train.tsv (rows repeating a
held-out text leave training). The head's form (softmax regression or a small MLP) and its
regularisation are chosen on a second seeded 10% of the training rows alone; the final
head is fitted on all training rows.
"""

from __future__ import annotations

from pathlib import Path

from taskmux.modelrepo.datasets import LabelledRows, read_agnews
from taskmux.modelrepo.fit import FitOptions
from taskmux.modelrepo.recipe import (
    SPLIT_SEED,
    Candidate,
    Choice,
    Dataset,
    DistinctSplit,
    Examples,
    Fitted,
    Report,
    encode_labels,
    heldout_accuracy,
    split_distinct,
)

TOPIC_FLOOR = 0.87  # held-out accuracy
DATA_FILE = Path("agnews") / "train.tsv"
CANDIDATES = (
    Candidate(FitOptions(l2=1e-2)),
    Candidate(FitOptions(l2=3e-2)),
    Candidate(FitOptions(hidden=256, l2=1e-3, epochs=20, learning_rate=1e-3, dropout=0.5)),
    Candidate(FitOptions(hidden=256, l2=1e-2, epochs=20, learning_rate=1e-3, dropout=0.5)),
)


def topic_split(data: LabelledRows, seed: int = SPLIT_SEED) -> DistinctSplit:
    """Training rows, held-out rows, and the count dropped as duplicates of held-out texts."""
    return split_distinct(data.texts, seed=seed)


def topic_heldout(data_dir: Path, seed: int = SPLIT_SEED) -> LabelledRows:
    """The held-out AG News rows."""
    data = read_agnews(data_dir / DATA_FILE)
    held = topic_split(data, seed).heldout
    return LabelledRows([data.texts[i] for i in held], [data.labels[i] for i in held])


def _load(data_dir: Path, seed: int) -> Examples[DistinctSplit]:
    data = read_agnews(data_dir / DATA_FILE)
    labels = data.label_set()
    split = topic_split(data, seed)
    inner = split_distinct(data.texts, seed=seed + 1, among=split.train)
    y = encode_labels(data.labels, labels)
    return Examples(labels, data.texts, y, split.train, inner.train, inner.heldout, split)


def _report(examples: Examples[DistinctSplit], fitted: Fitted) -> Report:
    held = examples.detail.heldout
    options = fitted.choice.options
    return Report({
        "heldout_accuracy": heldout_accuracy(examples, fitted, held),
        "heldout_examples": len(held),
        "validation_accuracy": fitted.choice.accuracy,
        "validation_examples": fitted.choice.examples,
        "train_examples": len(examples.fit),
        "rows_dropped_as_heldout_duplicates": examples.detail.dropped,
        "hidden": options.hidden,
        "l2": options.l2,
        "dropout": options.dropout,
    })  # fmt: skip


def _describe(choice: Choice, seed: int) -> str:
    hidden = choice.options.hidden
    form = f"an MLP (one ReLU layer of {hidden})" if hidden else "softmax regression"
    return (
        f"News topic (World, Sports, Business, Sci/Tech) of English text: {form} on "
        "L2-normalised all-MiniLM-L6-v2 vectors of the raw text, fitted on AG News "
        f"train.tsv; heldout_accuracy is on a seed-{seed} 10% of its distinct texts."
    )


TOPIC = Dataset("topic", _load, CANDIDATES, _report, _describe)
