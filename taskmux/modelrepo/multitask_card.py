"""The model card's section on the multi-task branch: how its heads were made and scored,
with the frozen heads' held-out figures beside theirs.

The frozen figures are those recorded in `trained/<name>/head.json` by
`taskmux model train-defaults` on the same held-out rows (same data, same `SPLIT_SEED`), so
the two columns compare like with like.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.manifest import MULTITASK, Manifest
from taskmux.modelrepo.build import trained_heads
from taskmux.modelrepo.evaluate import Figure
from taskmux.modelrepo.multitask_store import branch_meta
from taskmux.modelrepo.recipe import SPLIT_SEED

HELDOUT_ROWS = {
    "sentiment": "a seed-{seed} 10% of SST-2 train.tsv's whole sentences",
    "intent": "CLINC150 val (in scope) and oos_val (out of scope)",
    "topic": "a seed-{seed} 10% of AG News train.tsv's distinct texts",
    "entities": "a seed-{seed} 10% of CoNLL-2003 train.txt's distinct sentences",
}


def branch_section(manifest: Manifest, figures: Sequence[Figure]) -> str:
    """Markdown for the card ("" when no head reads the multi-task branch)."""
    on_branch = {h.name for h in manifest.heads if h.features == MULTITASK}
    if not on_branch:
        return ""
    meta = branch_meta() or {}
    frozen = {spec.name: spec.metrics for spec, _ in trained_heads()}
    lines = [
        "## Multi-task branch",
        "",
        *_how(manifest, meta),
        "",
        "| head | metric | multi-task branch (this eval) | frozen head (recorded) | floor "
        "| result | held-out rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        if f.head not in on_branch:
            continue
        before = frozen.get(f.head, {}).get(f"heldout_{f.metric}")
        was = "-" if before is None else f"{before:.4f}"
        floor = "-" if f.floor is None else f"≥ {f.floor:.3g}"
        result = {None: "-", True: "PASS", False: "FAIL"}[f.passed]
        rows = HELDOUT_ROWS.get(f.head, "-").format(seed=SPLIT_SEED)
        lines.append(
            f"| {f.head} | {f.metric} | {f.value:.4f} (n={f.examples}) | {was} | {floor} "
            f"| {result} | {rows} |"
        )
    return "\n".join([*lines, "", ""])


def _how(manifest: Manifest, meta: dict[str, Any]) -> list[str]:
    enc = manifest.encoder
    recipe = meta.get("recipe", {})
    lent = int(meta.get("sizes", {}).get("oos_borrowed", 0))
    flags = f" --oos-borrowed {lent}" if lent else ""
    passes = int(recipe.get("topic_passes", 1))
    flags += f" --topic-passes {passes}" if passes != 1 else ""
    passes = int(recipe.get("entities_passes", 1))
    flags += f" --entities-passes {passes}" if passes != 1 else ""
    choice = str(recipe.get("epoch_choice", "joint"))
    flags += f" --epoch-choice {choice}" if choice != "joint" else ""
    ema = float(recipe.get("ema", 0.0))
    flags += f" --ema {ema}" if ema else ""
    minutes = float(meta.get("train_seconds", 0.0)) / 60
    return [
        f"The encoder is cut after layer {enc.branch_layer}: a shared trunk (the original "
        f"layers below {enc.branch_layer}, run once per text), the embedding branch (the "
        "original upper layers: Embed, similarity, zero-shot) and the multi-task branch (a "
        "copy of the upper layers fine-tuned jointly with the heads marked `multitask` "
        "below). A worker runs a branch only for the texts whose heads read it.",
        "",
        "How the figures were obtained:",
        "",
        "- Trained by `taskmux model train-multitask --epochs "
        f"{recipe.get('epochs', '?')} --branch-layer {enc.branch_layer}"
        f"{flags}` "
        f"(seed {recipe.get('seed', '?')}, branch lr {recipe.get('branch_lr', '?')}, head lr "
        f"{recipe.get('head_lr', '?')}, batches of {recipe.get('batch_size', '?')} from one "
        f"task each, shuffled together; {minutes:.0f} min on a shared 2-core CPU; epoch "
        f"{meta.get('epoch_kept', '?')} kept by validation). Second stage: "
        + "; ".join(f"{name}: {form}" for name, form in meta.get("heads", {}).items())
        + " (`joint`: the linear head trained with the branch; otherwise a head refitted on "
        "the trained branch's outputs, kept because it validated better)."
        + (f" {meta['note']}" if meta.get("note") else ""),
        "- Training and validation rows come only from each frozen head's training side of "
        f"its split (`SPLIT_SEED` = {SPLIT_SEED}); the held-out rows below took part in no "
        "training and no choice (the intent threshold was chosen on validation rows).",
        "- Scored by `taskmux model eval` (`make eval`) through the served ONNX graphs "
        "(trunk, then the multi-task branch) and the worker's head classes.",
    ]
