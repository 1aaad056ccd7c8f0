"""`taskmux head train`: a new head from a labelled file, added to a model repository.

Everything that can be refused is checked before the encoder runs: the name, the data (see
`datasets.py`), the repository's integrity and the kind of any head already of that name.
The head is fitted on frozen encoder outputs, scored on a seeded held-out 10% of the
distinct texts (sentences for token heads), and stored as the next version of the head;
the weights that are scored are the weights written.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from taskmux_api.kinds import HeadKind

from model.manifest import HeadSpec, load_manifest
from taskmux.modelrepo.classify_train import (
    SPLIT_SEED,
    class_probs,
    encode_labels,
    hit_rate,
    served_labels,
    split_distinct,
)
from taskmux.modelrepo.datasets import entity_types, read_conll, read_table
from taskmux.modelrepo.embedding import Embedder
from taskmux.modelrepo.entities_train import (
    fit_token_head,
    scheme_labels,
    score_entities,
    split_sentences,
)
from taskmux.modelrepo.fit import FitOptions, fit_head
from taskmux.modelrepo.headstore import add_head_version, check_head_name, next_version

log = logging.getLogger(__name__)

MIN_STEPS = 300  # Adam steps at least, so that small files are fitted too


def fit_options(rows: int, hidden: int, seed: int) -> FitOptions:
    """Defaults for a head of `hidden` units fitted on `rows` examples."""
    steps_per_epoch = math.ceil(rows / 512)
    epochs = max(40 if hidden == 0 else 25, math.ceil(MIN_STEPS / steps_per_epoch))
    if hidden == 0:
        return FitOptions(epochs=epochs, seed=seed)
    return FitOptions(
        hidden=hidden, l2=1e-4, epochs=epochs, learning_rate=1e-3, dropout=0.3, seed=seed
    )


def train_classification_head(
    repo: Path,
    data: Path,
    name: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    hidden: int = 0,
    seed: int = SPLIT_SEED,
) -> dict[str, Any]:
    """Fit a sentence-classification head on `data` and add it to `repo`; report."""
    check_head_name(name)
    rows = read_table(data, text_column=text_column, label_column=label_column)
    next_version(load_manifest(repo), name, HeadKind.CLASSIFICATION)
    labels = rows.label_set()
    split = split_distinct(rows.texts, seed=seed)
    x = Embedder(repo).sentence_vectors(rows.texts)
    y = encode_labels(rows.labels, labels)
    params = fit_head(
        x[split.train], y[split.train], len(labels), fit_options(len(split.train), hidden, seed)
    )
    predicted = served_labels(class_probs(x[split.heldout], params), labels)
    metrics = {
        "heldout_accuracy": round(hit_rate(predicted, [rows.labels[i] for i in split.heldout]), 4),
        "heldout_examples": len(split.heldout),
        "train_examples": len(split.train),
    }
    spec = HeadSpec(
        name=name,
        kind=HeadKind.CLASSIFICATION,
        version="0",
        labels=labels,
        metrics={k: float(v) for k, v in metrics.items()},
        description=f"Trained by `taskmux head train` on {data.name} ({len(rows.texts)} rows).",
    )
    written = add_head_version(repo, spec, params)
    log.info("head %s version %s written to %s", name, written.version, repo)
    return {"name": name, "version": written.version, "labels": len(labels), "metrics": metrics}


def train_token_head(
    repo: Path,
    data: Path,
    name: str,
    *,
    scheme: str = "io",
    hidden: int = 256,
    seed: int = SPLIT_SEED,
) -> dict[str, Any]:
    """Fit a token-classification head on CoNLL-style `data` and add it to `repo`; report."""
    check_head_name(name)
    sentences = read_conll(data)
    labels = scheme_labels(entity_types(sentences), scheme)
    next_version(load_manifest(repo), name, HeadKind.TOKEN_CLASSIFICATION)
    split = split_sentences(sentences, seed=seed)
    encoded = Embedder(repo).token_states([s.text for s in sentences], cached=False)
    train = [sentences[i] for i in split.train]
    tokens = sum(len(encoded[i][1].ids) for i in split.train)
    params = fit_token_head(
        train, [encoded[i] for i in split.train], labels, scheme, fit_options(tokens, hidden, seed)
    )
    held = split.heldout
    scores = score_entities(
        [sentences[i] for i in held], [encoded[i] for i in held], params, labels
    )
    metrics = {
        "heldout_f1": round(scores.f1, 4),
        "heldout_precision": round(scores.precision, 4),
        "heldout_recall": round(scores.recall, 4),
        "heldout_sentences": scores.sentences,
        "heldout_entities": scores.gold,
        "train_sentences": len(train),
    }
    spec = HeadSpec(
        name=name,
        kind=HeadKind.TOKEN_CLASSIFICATION,
        version="0",
        labels=labels,
        metrics={k: float(v) for k, v in metrics.items()},
        description=(
            f"Trained by `taskmux head train --kind token` on {data.name} "
            f"({len(sentences)} sentences, {scheme.upper()} tags)."
        ),
    )
    written = add_head_version(repo, spec, params)
    log.info("head %s version %s written to %s", name, written.version, repo)
    return {"name": name, "version": written.version, "labels": len(labels), "metrics": metrics}
