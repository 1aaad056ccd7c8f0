"""`taskmux head train`: a new head from a labelled file, added to a model repository.

Everything that can be refused is checked before the encoder runs: the name, the data (see
`datasets.py`), the repository's integrity and the kind of any head already of that name.
The head is fitted on frozen encoder outputs, scored on a seeded held-out 10% of the
distinct texts (sentences for token heads), and stored as the next version of the head;
the weights that are scored are the weights written.

Which outputs (`features`, recorded in the head's manifest entry): the embedding branch
(the original encoder's, as Embed returns them), or the multi-task branch (the upper
layers fine-tuned on the shipped tasks; usually better features, and no extra pass when
other trained heads read the same texts). With `fine_tune` the head gets a branch of its
own instead (`finetune.py`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from taskmux_api.kinds import HeadKind

from model.manifest import EMBEDDING, MULTITASK, HeadSpec, Manifest, ModelRepoError, load_manifest
from taskmux.modelrepo.datasets import LabelledRows, entity_types, read_conll, read_table
from taskmux.modelrepo.embedding import Embedder
from taskmux.modelrepo.entities_train import (
    fit_token_head,
    scheme_labels,
    score_entities,
    split_sentences,
)
from taskmux.modelrepo.finetune import (
    FineTune,
    check_repository,
    fine_tune_classification_head,
    fine_tune_token_head,
)
from taskmux.modelrepo.fit import FitOptions, Params
from taskmux.modelrepo.headstore import (
    add_head_version,
    check_head_name,
    head_record,
    next_version,
)
from taskmux.modelrepo.recipe import (
    SPLIT_SEED,
    Candidate,
    DistinctSplit,
    Examples,
    Fitted,
    Report,
    encode_labels,
    fit_and_score,
    heldout_accuracy,
    rounded,
    split_distinct,
)

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
    features: str = EMBEDDING,
    fine_tune: FineTune | None = None,
) -> dict[str, Any]:
    """Fit a sentence-classification head on `data` and add it to `repo`; report.

    The shared recipe with one candidate (so nothing to choose, no inner split): the
    defaults of `fit_options` for the size of the file.
    """
    check_head_name(name)
    manifest = load_manifest(repo)
    if fine_tune is not None:
        version = _fine_tune_version(repo, manifest, name, HeadKind.CLASSIFICATION)
        return fine_tune_classification_head(
            repo, manifest, data, name, version,
            text_column=text_column, label_column=label_column, options=fine_tune,
        )  # fmt: skip
    check_features(repo, manifest, features)
    rows = read_table(data, text_column=text_column, label_column=label_column)
    next_version(manifest, name, HeadKind.CLASSIFICATION)
    examples = _examples(rows, seed)
    candidate = Candidate(fit_options(len(examples.fit), hidden, seed))
    embed = Embedder(repo, branch=features).sentence_vectors
    fitted, report = fit_and_score(examples, [candidate], _report, embed, seed)
    description = (
        f"Trained by `taskmux head train` on {data.name} ({len(rows.texts)} rows), "
        f"on the {features} branch's features."
    )
    record = head_record(
        name, HeadKind.CLASSIFICATION, examples.labels, rounded(report.metrics), description,
        features=features,
    )  # fmt: skip
    return _add(repo, record, fitted.params, report.metrics)


def check_features(repo: Path, manifest: Manifest, features: str) -> None:
    """Refuse features the repository's encoder does not compute."""
    if features not in (EMBEDDING, MULTITASK):
        raise ValueError(f"features must be {EMBEDDING} or {MULTITASK}, not {features!r}")
    if features not in manifest.encoder.parts and features != EMBEDDING:
        raise ModelRepoError(
            f"{repo} has no multi-task branch (its encoder is one graph), so a head cannot "
            f"read multitask features: train with --features {EMBEDDING}, or rebuild the "
            "repository with the committed branch (`taskmux model build --force`)"
        )


def _fine_tune_version(repo: Path, manifest: Manifest, name: str, kind: HeadKind) -> int:
    version = next_version(manifest, name, kind)
    check_repository(manifest, repo)
    return version


def _examples(rows: LabelledRows, seed: int) -> Examples[DistinctSplit]:
    labels = rows.label_set()
    split = split_distinct(rows.texts, seed=seed)
    y = encode_labels(rows.labels, labels)
    return Examples(labels, rows.texts, y, split.train, [], [], split)


def _report(examples: Examples[DistinctSplit], fitted: Fitted) -> Report:
    held = examples.detail.heldout
    return Report({
        "heldout_accuracy": heldout_accuracy(examples, fitted, held),
        "heldout_examples": len(held),
        "train_examples": len(examples.fit),
    })  # fmt: skip


def _add(repo: Path, record: HeadSpec, params: Params, metrics: dict[str, float]) -> dict[str, Any]:
    """Add `record` as the next version of its head in `repo`; the report to print."""
    written = add_head_version(repo, record, params)
    log.info("head %s version %s written to %s", record.name, written.version, repo)
    encoder = load_manifest(repo, verify=False).encoder
    return {
        "name": record.name,
        "version": written.version,
        "labels": len(record.labels),
        "features": record.features,
        "features_cost": encoder.branch_cost(record.features),
        "metrics": rounded(metrics, integer_counts=True),
    }


def train_token_head(
    repo: Path,
    data: Path,
    name: str,
    *,
    scheme: str = "io",
    hidden: int = 256,
    seed: int = SPLIT_SEED,
    features: str = EMBEDDING,
    fine_tune: FineTune | None = None,
) -> dict[str, Any]:
    """Fit a token-classification head on CoNLL-style `data` and add it to `repo`; report."""
    check_head_name(name)
    manifest = load_manifest(repo)
    if fine_tune is not None:
        version = _fine_tune_version(repo, manifest, name, HeadKind.TOKEN_CLASSIFICATION)
        return fine_tune_token_head(
            repo, manifest, data, name, version, scheme=scheme, options=fine_tune
        )
    check_features(repo, manifest, features)
    sentences = read_conll(data)
    labels = scheme_labels(entity_types(sentences), scheme)
    next_version(manifest, name, HeadKind.TOKEN_CLASSIFICATION)
    split = split_sentences(sentences, seed=seed)
    encoded = Embedder(repo, branch=features).token_states(
        [s.text for s in sentences], cached=False
    )
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
        "heldout_f1": scores.f1,
        "heldout_precision": scores.precision,
        "heldout_recall": scores.recall,
        "heldout_sentences": scores.sentences,
        "heldout_entities": scores.gold,
        "train_sentences": len(train),
    }
    description = (
        f"Trained by `taskmux head train --kind token` on {data.name} "
        f"({len(sentences)} sentences, {scheme.upper()} tags), on the {features} branch's "
        "features."
    )
    record = head_record(
        name, HeadKind.TOKEN_CLASSIFICATION, labels, rounded(metrics), description,
        features=features,
    )  # fmt: skip
    return _add(repo, record, params, metrics)
