"""`taskmux model eval --variant int8`: how far a variant's answers move from fp32's.

Two measures, both through the serving path (`evaluate.evaluate`, the worker's head
classes, the Embedder's length-sorted token-budget batches):

- agreement: cosine of the variant's sentence vector with fp32's, mean and min over the
  first `AGREEMENT_PER_SET` held-out texts of each shipped data set;
- every shipped head's held-out figures on the variant next to fp32's.

The figures go into the variant's manifest entry (so `auto` can apply the accuracy rule of
`variants.int8_verdict` when a worker starts), into `quantize.VARIANT_RECORD` (so later
builds of the same file carry them), and into MODEL_CARD.md (`card_section`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.encoder import l2_normalize
from model.manifest import Manifest, ModelRepoError, load_manifest, write_manifest
from model.variants import (
    FLOOR_FAILURES,
    INT8,
    LOSS_PREFIX,
    MAX_HEAD_LOSS_POINTS,
    int8_verdict,
)
from taskmux.modelrepo.build import is_packaged
from taskmux.modelrepo.embedding import Embedder
from taskmux.modelrepo.entities_head import entities_heldout
from taskmux.modelrepo.evaluate import Figure, VariantEmbedder, evaluate
from taskmux.modelrepo.intent import intent_heldout
from taskmux.modelrepo.quantize import record_metrics
from taskmux.modelrepo.sentiment import sentiment_heldout
from taskmux.modelrepo.topic import topic_heldout

AGREEMENT_PER_SET = 100


@dataclass(frozen=True)
class Comparison:
    """A variant against fp32: embedding agreement and paired head figures."""

    variant: str
    cosine_mean: float
    cosine_min: float
    texts: int
    pairs: list[tuple[Figure, Figure]]  # (fp32, variant), same head and metric
    alone_mean: float  # cosine of a text's vector encoded alone with it in a batch
    alone_min: float

    def metrics(self) -> dict[str, float]:
        """The flat dict stored in the manifest's VariantSpec.metrics."""
        out = {
            "cosine_mean": self.cosine_mean,
            "cosine_min": self.cosine_min,
            "cosine_texts": float(self.texts),
            "alone_vs_batch_cosine_mean": self.alone_mean,
            "alone_vs_batch_cosine_min": self.alone_min,
            FLOOR_FAILURES: float(sum(v.passed is False for _, v in self.pairs)),
        }
        for ref, var in self.pairs:
            key = f"{ref.head}.{ref.metric}"
            out[f"fp32.{key}"] = ref.value
            out[f"{self.variant}.{key}"] = var.value
            if ref.floor is not None:  # the figures the accuracy rule weighs
                out[LOSS_PREFIX + key] = (ref.value - var.value) * 100
        return out


def agreement_texts(data_dir: Path, per_set: int = AGREEMENT_PER_SET) -> list[str]:
    """Held-out texts of every shipped data set: reviews, news, queries, CoNLL sentences."""
    return [
        *sentiment_heldout(data_dir).texts[:per_set],
        *topic_heldout(data_dir).texts[:per_set],
        *intent_heldout(data_dir)[0].texts[:per_set],
        *(s.text for s in entities_heldout(data_dir)[:per_set]),
    ]


def compare(repo: Path, data_dir: Path, variant: str, fp32: list[Figure]) -> Comparison:
    """Measure `variant` against the fp32 figures already computed for the same repo."""
    texts = agreement_texts(data_dir)
    reference = Embedder(repo).sentence_vectors(texts)
    embedder = VariantEmbedder(repo, variant)
    batched = embedder.sentence_vectors(texts)
    cosines = np.sum(reference * batched, axis=1)  # all vectors are unit length
    # A variant with per-call activation scales would tie a text's vector to its batch.
    alone = np.concatenate([l2_normalize(embedder.encoder.encode([t])[0]) for t in texts])
    stability = np.sum(alone * batched, axis=1)
    figures = evaluate(repo, data_dir, variant=variant)
    return Comparison(
        variant,
        float(cosines.mean()),
        float(cosines.min()),
        len(texts),
        list(zip(fp32, figures, strict=True)),
        float(stability.mean()),
        float(stability.min()),
    )


def store(repo: Path, comparison: Comparison) -> Manifest:
    """Write the comparison into the manifest (re-read just before) and, for the packaged
    encoder, the committed record (another encoder's figures stay in its manifest)."""
    manifest = load_manifest(repo, verify=False)
    spec = manifest.encoder.variants.get(comparison.variant)
    if spec is None:
        raise ModelRepoError(f"the repository has no {comparison.variant} variant any more")
    spec = dataclasses.replace(spec, metrics=comparison.metrics())
    encoder = dataclasses.replace(
        manifest.encoder, variants={**manifest.encoder.variants, comparison.variant: spec}
    )
    manifest = dataclasses.replace(manifest, encoder=encoder)
    write_manifest(repo, manifest)
    if is_packaged(manifest.encoder):
        record_metrics(comparison.variant, spec)
    return manifest


def format_comparison(comparison: Comparison) -> str:
    """A fixed-width table of the paired figures, then agreement and the decision."""
    name = comparison.variant.upper()
    rows = [("HEAD", "METRIC", "FP32", name, "DELTA (points)", "GATED")]
    for ref, var in comparison.pairs:
        gated = "yes" if ref.floor is not None else "-"
        delta = (var.value - ref.value) * 100
        rows.append(
            (ref.head, ref.metric, f"{ref.value:.4f}", f"{var.value:.4f}", f"{delta:+.2f}", gated)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
    return f"{table}\n\n{_agreement(comparison.variant, comparison.metrics())}\n" + (
        _decision(comparison.metrics()) if comparison.variant == INT8 else ""
    )


def card_section(manifest: Manifest) -> str:
    """MODEL_CARD.md's section on encoder variants, from the manifest's recorded figures."""
    variants = manifest.encoder.variants
    if not variants:
        return ""
    lines = ["", "## Encoder variants", ""]  # after render()'s last line
    lines += [
        "Workers run one file of the encoder (`TASKMUX_ENCODER_VARIANT`, default `auto`: fp16",
        "on CUDA, else int8 when it passes the rule below, else fp32).",
        "",
    ]
    for name, spec in sorted(variants.items()):
        lines += [f"### {name}", "", f"`{spec.file}`: {spec.recipe}.", ""]
        if not spec.metrics:
            lines += ["Not evaluated here" + (" (it needs a GPU)." if name != INT8 else "."), ""]
            continue
        lines += [_agreement(name, spec.metrics), ""]
        lines += [
            "| head | metric | fp32 | " + name + " | change (points) |",
            "|---|---|---|---|---|",
        ]
        for key in sorted(k.removeprefix("fp32.") for k in spec.metrics if k.startswith("fp32.")):
            ref, var = spec.metrics[f"fp32.{key}"], spec.metrics.get(f"{name}.{key}", math.nan)
            head, _, metric = key.partition(".")
            lines.append(
                f"| {head} | {metric} | {ref:.4f} | {var:.4f} | {(var - ref) * 100:+.2f} |"
            )
        lines.append("")
        if name == INT8:
            lines += [_decision(spec.metrics), ""]
    return "\n".join(lines)


def _agreement(name: str, metrics: dict[str, float]) -> str:
    text = (
        f"Cosine of {name} sentence vectors with fp32's over {int(metrics['cosine_texts'])} "
        f"held-out texts: mean {metrics['cosine_mean']:.4f}, min {metrics['cosine_min']:.4f}."
    )
    if "alone_vs_batch_cosine_min" in metrics:
        text += (
            f" The same text's {name} vector encoded alone vs in a batch: cosine mean "
            f"{metrics['alone_vs_batch_cosine_mean']:.4f}, min "
            f"{metrics['alone_vs_batch_cosine_min']:.4f} (fp32: 1; a variant whose activation "
            "scales are computed per call over the batch falls below 0.999)."
        )
    return text


def _decision(metrics: dict[str, float]) -> str:
    ok, why = int8_verdict(metrics)
    default = "int8 is the CPU default" if ok else "fp32 stays the CPU default"
    return f"Decision: {default} ({why}; the rule allows {MAX_HEAD_LOSS_POINTS:g} point)."
