"""`taskmux head train --fine-tune`: a head with a branch of its own.

A copy of the encoder's original upper layers (the embedding branch) is fine-tuned jointly
with a new linear head on the user's file, by the multi-task branch's training loop
(`multitask.train` with one task; the trunk stays frozen). The branch is exported to ONNX
as the multi-task branch is (`multitask_export.export_branch`), in every variant the
repository has (`quantize.build_part_variants`), into the head's version folder, and the
manifest lists it as an encoder part named `<head>-v<version>` (`BRANCH_NAME`) that the
head's `features` names. Workers open it without a restart and run it once per batch for
the texts sent to heads that read it.

What it costs: one more branch pass (`EncoderSpec.branch_cost` of a full encoder pass)
for each text sent to the head, and the branch's files in the repository (about 28 MB
fp32 for four layers of all-MiniLM-L6-v2, plus its variants).

Splits: the seeded 10% that every `head train` holds out is scored after training,
through ONNX Runtime as a worker computes it (fp32), and never read before; the epoch
kept is picked on a further seeded 10% of the training rows.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskmux_api.kinds import HeadKind

from model.encoder import Encoder, l2_normalize
from model.manifest import FP32, Manifest, ModelRepoError, PartFile, sha256_file
from model.parts import TRUNK
from model.variants import CPU
from taskmux.modelrepo.build import packaged_source, quiet_export
from taskmux.modelrepo.calibration import token_feeds
from taskmux.modelrepo.datasets import TaggedSentence, entity_types, read_conll, read_table
from taskmux.modelrepo.entities_train import scheme_labels, score_entities, split_sentences
from taskmux.modelrepo.fit import Params
from taskmux.modelrepo.headstore import Branch, add_head_version, head_record
from taskmux.modelrepo.multitask_data import Task, TaskRows, load_tokenizer, token_rows
from taskmux.modelrepo.multitask_export import export_branch
from taskmux.modelrepo.quantize import build_part_variants
from taskmux.modelrepo.recipe import (
    SPLIT_SEED,
    class_probs,
    encode_labels,
    hit_rate,
    rounded,
    served_labels,
    split_distinct,
)

if TYPE_CHECKING:  # torch is imported when a run starts, not by `head train` without it
    from taskmux.modelrepo.multitask import Recipe, Trained

log = logging.getLogger(__name__)

# Training texts the int8 branch's activation ranges are fitted on (static quantisation).
CALIBRATION_TEXTS = 256
TRAIN_TOKENS = 128  # texts are cut here while training (serving reads up to 256)
# With the default epochs, a small file is passed over again until the run has taken this
# many steps (at most MAX_AUTO_EPOCHS passes): one pass over a hundred rows is three steps,
# which leaves a fresh head near chance. 2,000 rows take two epochs.
MIN_STEPS = 60
MAX_AUTO_EPOCHS = 10
BRANCH_FILE = "branch.onnx"


def progress(line: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class FineTune:
    """Hyperparameters of `--fine-tune` (the multi-task branch's, on one task)."""

    # 0: enough for MIN_STEPS steps. With more than one, the epoch kept is the best on
    # the validation rows.
    epochs: int = 0
    branch_lr: float = 1e-4
    head_lr: float = 2e-3
    batch_size: int = 32
    threads: int = 1  # torch threads; more help on a machine of your own
    seed: int = SPLIT_SEED

    def recipe(self, branch_layer: int, rows: int) -> Recipe:
        """The multi-task loop's recipe for a run on `rows` training rows."""
        from taskmux.modelrepo.multitask import Recipe

        steps = max(1, math.ceil(rows / self.batch_size))
        epochs = self.epochs or min(MAX_AUTO_EPOCHS, math.ceil(MIN_STEPS / steps))
        return replace(
            Recipe(),
            branch_layer=branch_layer,
            epochs=epochs,
            batch_size=self.batch_size,
            branch_lr=self.branch_lr,
            head_lr=self.head_lr,
            seed=self.seed,
            threads=self.threads,
            log_every=10,
        )


def check_repository(manifest: Manifest, repo: Path) -> None:
    """Refuse a repository whose encoder cannot carry a branch trained from the packaged
    encoder: one without a trunk, or one built from another encoder."""
    if not manifest.encoder.parts:
        raise ModelRepoError(
            f"{repo} has no split encoder (trunk and branches), so a head cannot have a "
            "branch of its own: train without --fine-tune, or rebuild the repository with "
            "the committed multi-task branch (`taskmux model build --force`)"
        )
    if manifest.encoder.source != packaged_source():
        raise ModelRepoError(
            f"{repo}'s encoder is {manifest.encoder.source!r} and --fine-tune trains from "
            f"the packaged {packaged_source()!r}; rebuild it with `taskmux model build --force`"
        )


def fine_tune_classification_head(
    repo: Path,
    manifest: Manifest,
    data: Path,
    name: str,
    version: int,
    *,
    text_column: str = "text",
    label_column: str = "label",
    options: FineTune = FineTune(),
    emit: Callable[[str], None] = progress,
) -> dict[str, Any]:
    """Fine-tune a branch and a classification head on `data`; add both to `repo`."""
    rows = read_table(data, text_column=text_column, label_column=label_column)
    labels = rows.label_set()
    y = encode_labels(rows.labels, labels).tolist()
    split = split_distinct(rows.texts, seed=options.seed)
    inner = split_distinct(rows.texts, seed=options.seed + 1, among=split.train)
    tokenizer = load_tokenizer(repo / manifest.encoder.tokenizer_file, TRAIN_TOKENS)

    def part(picked: Sequence[int]) -> TaskRows:
        texts = [rows.texts[i] for i in picked]
        return TaskRows(tokenizer.encode_batch(texts), [y[i] for i in picked], texts)

    task = Task(name, HeadKind.CLASSIFICATION, labels, part(inner.train), part(inner.heldout))
    run = _Run(repo, manifest, name, version, options, emit)
    trained = run.train(task)
    params = run.head_params(trained)
    held = [rows.texts[i] for i in split.heldout]

    def score(encoder: Encoder, branch: str) -> dict[str, float]:
        pooled, _ = encoder.encode(held, branch=branch)
        answers = served_labels(class_probs(l2_normalize(pooled), params), labels)
        return {
            "heldout_accuracy": hit_rate(answers, [rows.labels[i] for i in split.heldout]),
            "heldout_examples": len(held),
            "train_examples": len(task.train),
        }

    return run.finish(task, trained, params, score, f"{data.name} ({len(rows.texts)} rows)")


def fine_tune_token_head(
    repo: Path,
    manifest: Manifest,
    data: Path,
    name: str,
    version: int,
    *,
    scheme: str = "io",
    options: FineTune = FineTune(),
    emit: Callable[[str], None] = progress,
) -> dict[str, Any]:
    """Fine-tune a branch and a token-classification head on CoNLL `data`; add both."""
    sentences = read_conll(data)
    labels = scheme_labels(entity_types(sentences), scheme)
    split = split_sentences(sentences, seed=options.seed)
    inner = split_sentences(sentences, seed=options.seed + 1, among=split.train)
    tokenizer = load_tokenizer(repo / manifest.encoder.tokenizer_file, TRAIN_TOKENS)

    def part(picked: Sequence[int]) -> tuple[TaskRows, list[TaggedSentence]]:
        chosen = [sentences[i] for i in picked]
        return token_rows(tokenizer, chosen, labels, scheme), chosen

    (train_rows, _), (val_rows, val_sentences) = part(inner.train), part(inner.heldout)
    task = Task(
        name, HeadKind.TOKEN_CLASSIFICATION, tuple(labels), train_rows, val_rows,
        val_sentences=val_sentences,
    )  # fmt: skip
    run = _Run(repo, manifest, name, version, options, emit)
    trained = run.train(task)
    params = run.head_params(trained)
    held = [sentences[i] for i in split.heldout]

    def score(encoder: Encoder, branch: str) -> dict[str, float]:
        encoded = encoder.encode_tokens([s.text for s in held], branch=branch)
        scores = score_entities(held, encoded, params, labels)
        return {
            "heldout_f1": scores.f1,
            "heldout_precision": scores.precision,
            "heldout_recall": scores.recall,
            "heldout_sentences": scores.sentences,
            "heldout_entities": scores.gold,
            "train_sentences": len(task.train),
        }

    what = f"{data.name} ({len(sentences)} sentences, {scheme.upper()} tags)"
    return run.finish(task, trained, params, score, what)


Scorer = Callable[[Encoder, str], dict[str, float]]


@dataclass
class _Run:
    """One fine-tuning run: train, export, score through ONNX Runtime, add to the repo."""

    repo: Path
    manifest: Manifest
    name: str
    version: int
    options: FineTune
    emit: Callable[[str], None]
    started: float = 0.0
    epochs: int = 0  # what the run took

    @property
    def branch(self) -> str:
        return f"{self.name}-v{self.version}"

    @property
    def folder(self) -> Path:
        return self.repo / "heads" / self.name / str(self.version)

    def train(self, task: Task) -> Trained:
        from taskmux.modelrepo.multitask import train

        self.started = time.monotonic()
        recipe = self.options.recipe(self.manifest.encoder.branch_layer, len(task.train))
        self.epochs = recipe.epochs
        self.emit(
            f"fine-tuning branch {self.branch} (layers {recipe.branch_layer}+ of the encoder) "
            f"and the head on {len(task.train)} rows, {len(task.val)} for validation, "
            f"{recipe.epochs} epoch(s)"
        )
        with quiet_export():  # transformers' weight-loading bar
            return train([task], recipe, self.emit)

    def head_params(self, trained: Trained) -> Params:
        from taskmux.modelrepo.multitask import head_params

        return head_params(trained.net, self.name)

    def finish(
        self, task: Task, trained: Trained, params: Params, score: Scorer, what: str
    ) -> dict[str, Any]:
        """Export the branch, score the head through it, and add both to the repository;
        the branch's files are removed again if anything fails before the manifest is."""
        train_s = time.monotonic() - self.started
        try:
            branch = self._export(trained, task)
            spec = self.manifest.encoder.with_layer_counts(branch.encoder_layers)
            scoring = Encoder(self.repo, spec.with_branches({self.branch: branch.files}),
                              providers=[CPU])  # fmt: skip
            metrics = score(scoring, self.branch)
            description = (
                f"Trained by `taskmux head train --fine-tune` on {what}: a linear head on its "
                f"own branch ({branch.files[FP32].layers} upper layers of the encoder "
                f"fine-tuned with it, {self.epochs} epoch(s), seed {self.options.seed})."
            )
            record = head_record(
                self.name, task.kind, task.labels, rounded(metrics), description,
                features=self.branch,
            )  # fmt: skip
            written = add_head_version(self.repo, record, params, branch=branch)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        cost = spec.with_branches({self.branch: branch.files}).branch_cost(self.branch)
        return {
            "name": written.name,
            "version": written.version,
            "labels": len(task.labels),
            "features": self.branch,
            "features_cost": cost,
            "train_seconds": round(train_s, 1),
            "seconds": round(time.monotonic() - self.started, 1),
            "metrics": rounded(metrics, integer_counts=True),
        }

    def _export(self, trained: Trained, task: Task) -> Branch:
        """branch.onnx and its variants in the head's version folder; int8 is calibrated
        on the head's own training texts, as the fp32 trunk turns them into states."""
        self.folder.mkdir(parents=True, exist_ok=True)
        rel = f"heads/{self.name}/{self.version}/{BRANCH_FILE}"
        net = trained.net
        layers = len(net.branch.layers.layer)
        self.emit(f"exporting branch {self.branch} to ONNX ({layers} layers)")
        with quiet_export():
            export_branch(net.branch, net.dim, self.repo / rel)
        variants = sorted(self.manifest.encoder.variants)
        if variants:
            self.emit(f"building its {', '.join(variants)} variants")
        texts = task.train.texts[:CALIBRATION_TEXTS]
        tokenizer = self.repo / self.manifest.encoder.tokenizer_file
        trunk = self.manifest.encoder.parts[TRUNK].file
        built = build_part_variants(
            self.repo, {self.branch: rel}, variants, lambda: token_feeds(tokenizer, texts), trunk
        )
        files = {FP32: PartFile(rel, sha256_file(self.repo / rel), layers)}
        files |= {v: replace(by_part[self.branch], layers=layers) for v, by_part in built.items()}
        return Branch(self.version, self.branch, files, len(net.trunk.layers.layer) + layers)
