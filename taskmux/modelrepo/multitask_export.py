"""Export the split encoder: trunk, embedding branch and multi-task branch as ONNX graphs.

Run by `taskmux model build` when `trained/multitask/` holds a committed branch: the trunk
and the embedding branch come from the packaged encoder, the multi-task branch from the
same upper layers with the committed (float16) parameters loaded into them. Each graph gets
the variants the build makes (int8, fp16), so every variant covers every part. Without a
committed branch nothing here runs and the repository has the single graph only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from model.manifest import EMBEDDING, MULTITASK, TRUNK, EncoderSpec, PartFile, sha256_file
from taskmux.modelrepo.multitask_store import BRANCH_FILE, MULTITASK_DIR, branch_meta
from taskmux.modelrepo.quantize import build_part_variants, calibration_feeds

log = logging.getLogger(__name__)

OPSET = 17
PART_FILES = {
    TRUNK: "encoder/trunk.onnx",
    EMBEDDING: "encoder/embedding.onnx",
    MULTITASK: "encoder/multitask.onnx",
}


def export_trunk(trunk: Any, out_file: Path) -> None:
    """(input_ids, attention_mask, token_type_ids) -> hidden [batch, seq, dim]."""
    import torch

    sample = torch.ones(2, 8, dtype=torch.long)
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in [*inputs, "hidden"]}
    with torch.no_grad():
        torch.onnx.export(
            trunk.eval(), (sample, sample, torch.zeros_like(sample)), str(out_file),
            input_names=inputs, output_names=["hidden"], dynamic_axes=axes,
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip


def export_branch(branch: Any, dim: int, out_file: Path) -> None:
    """(hidden, attention_mask) -> token_embeddings [batch, seq, dim], pooled [batch, dim]."""
    import torch

    hidden = torch.zeros(2, 8, dim)
    mask = torch.ones(2, 8, dtype=torch.long)
    axes = {
        n: {0: "batch", 1: "sequence"} for n in ("hidden", "attention_mask", "token_embeddings")
    }
    axes["pooled"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            branch.eval(), (hidden, mask), str(out_file),
            input_names=["hidden", "attention_mask"],
            output_names=["token_embeddings", "pooled"], dynamic_axes=axes,
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip


def export_parts(model_dir: Path, branch_dir: Path, out: Path, branch_layer: int) -> int:
    """Write the three graphs of PART_FILES under `out`; the encoder's layer count."""
    from taskmux.modelrepo.branches import copy_branch, cut, load_bert, load_branch_arrays

    bert = load_bert(model_dir)
    trunk, embedding = cut(bert, branch_layer)
    multitask = copy_branch(embedding)
    with np.load(branch_dir / BRANCH_FILE) as data:
        load_branch_arrays(multitask, {k: data[k] for k in data.files})
    dim = int(bert.config.hidden_size)
    export_trunk(trunk, out / PART_FILES[TRUNK])
    export_branch(embedding, dim, out / PART_FILES[EMBEDDING])
    export_branch(multitask, dim, out / PART_FILES[MULTITASK])
    return len(bert.encoder.layer)


def add_parts(
    staging: Path,
    model_dir: Path,
    encoder: EncoderSpec,
    variants: Sequence[str],
    data_dir: Path,
    branch_dir: Path = MULTITASK_DIR,
) -> EncoderSpec:
    """`encoder` with the split graphs (and their variants) when a branch is committed;
    `encoder` unchanged otherwise."""
    meta = branch_meta(branch_dir)
    if meta is None:
        log.info("no multi-task branch in %s: the encoder stays one graph", branch_dir)
        return encoder
    layer = int(meta["branch_layer"])
    log.info("exporting the trunk (layers < %d) and both branches to ONNX", layer)
    total = export_parts(model_dir, branch_dir, staging, layer)
    layers = {n: total - layer for n in PART_FILES} | {TRUNK: layer}
    parts = {n: PartFile(f, sha256_file(staging / f), layers[n]) for n, f in PART_FILES.items()}
    by_variant = build_part_variants(
        staging, PART_FILES, variants, partial(calibration_feeds, staging, data_dir)
    )
    specs = {
        name: replace(
            spec, parts={n: replace(f, layers=layers[n]) for n, f in by_variant[name].items()}
        )
        for name, spec in encoder.variants.items()
    }
    return replace(encoder, parts=parts, branch_layer=layer, variants=specs)
