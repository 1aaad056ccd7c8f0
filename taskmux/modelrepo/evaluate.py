"""`taskmux model eval`: each shipped head's held-out figure, recomputed on the serving path.

Heads are loaded from the model repository with `model.heads.load_heads`, the classes a
worker serves them with; sentence heads read L2-normalised pooled vectors, the entities head
reads the float32 token states of the raw text and decodes spans with
`model.entities.decode_entities`; a classification head's threshold is applied as the
worker applies it. Each held-out split is rebuilt from the data with the trainer's seed.

A head reads the encoder output its spec names (`HeadSpec.features`): the embedding branch
or the multi-task branch, as the worker does. Heads on the multi-task branch are held to the
higher floors of `MULTITASK_FLOORS` (issue 14: what a fine-tuned model of that size gets).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.encoder import Encoder
from model.heads import Head, LinearClassifierHead, TokenClassifierHead, load_heads
from model.manifest import EMBEDDING
from model.variants import FP32
from taskmux.modelrepo.datasets import LabelledRows
from taskmux.modelrepo.embedding import Embedder
from taskmux.modelrepo.entities_head import ENTITIES_FLOOR, entities_heldout
from taskmux.modelrepo.entities_train import score_entities
from taskmux.modelrepo.intent import INTENT_FLOOR, intent_heldout
from taskmux.modelrepo.recipe import hit_rate, served_labels
from taskmux.modelrepo.sentiment import SENTIMENT_FLOOR, sentiment_heldout
from taskmux.modelrepo.topic import TOPIC_FLOOR, topic_heldout


@dataclass(frozen=True)
class Figure:
    """One held-out figure of one head, with its floor when it has one."""

    head: str
    metric: str
    value: float
    examples: int
    floor: float | None = None
    recorded: float | None = None  # what head.json says, for comparison

    @property
    def passed(self) -> bool | None:
        """None when there is no floor."""
        if self.floor is None:
            return None
        return not math.isnan(self.value) and self.value >= self.floor


Evaluator = Callable[[Head, Embedder, Path], list[Figure]]


class VariantEmbedder(Embedder):
    """The Embedder on another encoder variant (e.g. int8), on CPU.

    No cache: its keys name the fp32 files only, so a variant would read fp32 vectors.
    """

    def __init__(self, repo: Path, variant: str, branch: str = EMBEDDING) -> None:
        super().__init__(repo, branch=branch)
        self.encoder = Encoder(
            repo, self.manifest.encoder, providers=["CPUExecutionProvider"], variant=variant
        )


def evaluate(
    repo: Path, data_dir: Path, *, cache_dir: Path | None = None, variant: str = FP32
) -> list[Figure]:
    """Every shipped head's figures on `variant` of the encoder; a shipped head missing
    from the repository fails."""
    embedders: dict[str, Embedder] = {}

    def embedder_for(branch: str) -> Embedder:
        if branch not in embedders:
            embedders[branch] = (
                Embedder(repo, cache_dir=cache_dir, branch=branch)
                if variant == FP32
                else VariantEmbedder(repo, variant, branch)
            )
        return embedders[branch]

    heads = load_heads(repo, embedder_for(EMBEDDING).manifest)
    figures: list[Figure] = []
    for name, (evaluator, metric, floor) in SHIPPED.items():
        head = heads.get(name)
        if head is None:
            figures.append(Figure(name, f"{metric} (head missing)", math.nan, 0, floor))
            continue
        figures += evaluator(head, embedder_for(head.spec.features), data_dir)
    return figures


# Floors of heads on the multi-task branch, by (head, metric); other figures have none.
MULTITASK_FLOORS = {
    ("sentiment", "accuracy"): 0.86,
    ("intent", "inscope_accuracy_at_threshold"): 0.95,
    ("intent", "oos_recall_at_threshold"): 0.80,
    ("topic", "accuracy"): 0.895,
    ("entities", "f1"): 0.85,
}


def floor_of(head: Head, metric: str, frozen_floor: float | None) -> float | None:
    """The floor of one figure: `frozen_floor` for a head on the embedding branch."""
    if head.spec.features == EMBEDDING:
        return frozen_floor
    return MULTITASK_FLOORS.get((head.spec.name, metric))


def _accuracy(head: Head, embedder: Embedder, rows: LabelledRows, *, threshold: bool) -> float:
    """Accuracy of the served answers (with the head's threshold rule if `threshold`)."""
    assert isinstance(head, LinearClassifierHead)
    spec = head.spec
    probs = head.apply(embedder.sentence_vectors(rows.texts))
    if not threshold:
        return hit_rate(served_labels(probs, spec.labels), rows.labels)
    answers = served_labels(
        probs, spec.labels, threshold=spec.threshold, fallback=spec.fallback_label
    )
    return hit_rate(answers, rows.labels)


def _figure(
    head: Head, metric: str, value: float, examples: int, floor: float | None = None
) -> Figure:
    recorded = head.spec.metrics.get(f"heldout_{metric}")
    floor = floor_of(head, metric, floor)
    return Figure(head.spec.name, metric, value, examples, floor, recorded)


def _sentiment(head: Head, embedder: Embedder, data_dir: Path) -> list[Figure]:
    rows = sentiment_heldout(data_dir)
    value = _accuracy(head, embedder, rows, threshold=True)
    return [_figure(head, "accuracy", value, len(rows.texts), SENTIMENT_FLOOR)]


# AG News texts are news descriptions of 30 to 40 words; callers also send headlines and
# short sentences, so the card also shows topic on the first words of each held-out text
# (no floor: it says how the head degrades, it gates nothing).
SHORT_INPUT_WORDS = 12


def first_words(rows: LabelledRows, count: int) -> LabelledRows:
    """The rows with each text cut to its first `count` words."""
    return LabelledRows([" ".join(t.split()[:count]) for t in rows.texts], rows.labels)


def _topic(head: Head, embedder: Embedder, data_dir: Path) -> list[Figure]:
    rows = topic_heldout(data_dir)
    value = _accuracy(head, embedder, rows, threshold=True)
    short = _accuracy(head, embedder, first_words(rows, SHORT_INPUT_WORDS), threshold=True)
    return [
        _figure(head, "accuracy", value, len(rows.texts), TOPIC_FLOOR),
        _figure(head, f"accuracy_first_{SHORT_INPUT_WORDS}_words", short, len(rows.texts)),
    ]


def _intent(head: Head, embedder: Embedder, data_dir: Path) -> list[Figure]:
    inscope, oos = intent_heldout(data_dir)
    n_in, n_oos = len(inscope.texts), len(oos.texts)
    return [
        _figure(head, "inscope_accuracy", _accuracy(head, embedder, inscope, threshold=False),
                n_in, INTENT_FLOOR),
        _figure(head, "inscope_accuracy_at_threshold",
                _accuracy(head, embedder, inscope, threshold=True), n_in, INTENT_FLOOR),
        _figure(head, "oos_recall_at_threshold", _accuracy(head, embedder, oos, threshold=True),
                n_oos),
    ]  # fmt: skip


def _entities(head: Head, embedder: Embedder, data_dir: Path) -> list[Figure]:
    assert isinstance(head, TokenClassifierHead)
    sentences = entities_heldout(data_dir)
    encoded = embedder.token_states([s.text for s in sentences], cached=False)
    scores = score_entities(sentences, encoded, head.params, head.spec.labels)
    return [
        _figure(head, "f1", scores.f1, scores.gold, ENTITIES_FLOOR),
        _figure(head, "precision", scores.precision, scores.predicted),
        _figure(head, "recall", scores.recall, scores.gold),
    ]


# name -> (evaluator, headline metric, floor)
SHIPPED: dict[str, tuple[Evaluator, str, float]] = {
    "sentiment": (_sentiment, "accuracy", SENTIMENT_FLOOR),
    "intent": (_intent, "inscope_accuracy", INTENT_FLOOR),
    "topic": (_topic, "accuracy", TOPIC_FLOOR),
    "entities": (_entities, "f1", ENTITIES_FLOOR),
}


def format_table(figures: list[Figure]) -> str:
    """A fixed-width table: head, metric, value, recorded, floor, examples, PASS/FAIL."""
    rows = [("HEAD", "METRIC", "VALUE", "RECORDED", "FLOOR", "N", "RESULT")]
    for f in figures:
        result = {None: "-", True: "PASS", False: "FAIL"}[f.passed]
        rows.append(
            (
                f.head,
                f.metric,
                f"{f.value:.4f}",
                "-" if f.recorded is None else f"{f.recorded:.4f}",
                "-" if f.floor is None else f">= {f.floor:.3g}",
                str(f.examples),
                result,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
