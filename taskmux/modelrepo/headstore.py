"""Where trained heads are kept: committed head folders, and versions in a model repository.

Two places hold heads:

- `taskmux/modelrepo/trained/<name>/{head.json,weights.npz}`: the shipped heads, written by
  `taskmux model train-defaults` and copied into a repository by `taskmux model build`.
- `<repo>/heads/<name>/<version>/weights.npz` plus the repository's manifest.json: what
  `taskmux head train` adds to a running deployment. The weights file is written (and
  renamed into place) before the manifest, and the manifest is replaced atomically, so a
  reader sees either the old manifest or a new one whose files all exist and match their
  checksums. Older versions' files stay where they are.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from taskmux_api.kinds import TRAINED, HeadKind

from model.manifest import (
    EMBEDDING,
    HeadSpec,
    Manifest,
    ModelRepoError,
    PartFile,
    load_manifest,
    sha256_file,
    write_manifest,
)
from taskmux.modelrepo.build import BUILTIN_HEADS
from taskmux.modelrepo.fit import Params

HEAD_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
RESERVED_NAMES = frozenset({h.name for h in BUILTIN_HEADS} | {"zero_shot"})


class HeadNameError(ValueError):
    """A head name that is malformed, reserved, or taken by a head of another kind."""


def check_head_name(name: str) -> None:
    """Refuse names outside `[a-z][a-z0-9_-]{0,62}` and the built-in heads' names."""
    if not HEAD_NAME.fullmatch(name):
        raise HeadNameError(
            f"head name {name!r} must match [a-z][a-z0-9_-]{{0,62}} (lower case, digits, _ -)"
        )
    if name in RESERVED_NAMES:
        raise HeadNameError(f"head name {name!r} is a built-in head; choose another name")


def next_version(manifest: Manifest, name: str, kind: str) -> int:
    """The version a new head called `name` of `kind` gets: the current one + 1, or 1."""
    check_head_name(name)
    current = manifest.head(name)
    if current is None:
        return 1
    if current.kind != kind:
        raise HeadNameError(
            f"head {name!r} is a {current.kind} head; it cannot become a {kind} head "
            "(choose another name)"
        )
    try:
        return int(current.version) + 1
    except ValueError as err:
        raise ModelRepoError(
            f"head {name!r} has a non-numeric version {current.version!r}"
        ) from err


def save_params(path: Path, params: Params) -> None:
    """Write head params as .npz (float32), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        arrays: dict[str, Any] = {k: np.asarray(v, np.float32) for k, v in params.items()}
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def head_record(
    name: str,
    kind: HeadKind,
    labels: Sequence[str],
    metrics: Mapping[str, float],
    description: str,
    *,
    threshold: float = 0.0,
    fallback_label: str = "",
    features: str = EMBEDDING,
) -> HeadSpec:
    """The record of a freshly trained head, version 1 (`add_head_version` renumbers it)."""
    return HeadSpec(
        name=name,
        kind=kind,
        version="1",
        labels=tuple(labels),
        metrics=dict(metrics),
        description=description,
        threshold=threshold,
        fallback_label=fallback_label,
        features=features,
    )


def trained_head_meta(head: HeadSpec) -> dict[str, Any]:
    """A shipped head's head.json (read back by `build.trained_heads`); a threshold is
    written only for a head that has a fallback label to answer below it."""
    meta: dict[str, Any] = {
        "name": head.name,
        "kind": head.kind,
        "version": head.version,
        "labels": list(head.labels),
        "metrics": head.metrics,
        "description": head.description,
    }
    if head.fallback_label:
        meta |= {"threshold": head.threshold, "fallback_label": head.fallback_label}
    return meta


def write_trained_head(out_dir: Path, head: HeadSpec, params: Params) -> None:
    """Write a shipped head folder: weights.npz, then head.json (what the build reads)."""
    save_params(out_dir / "weights.npz", params)
    tmp = out_dir / "head.json.tmp"
    tmp.write_text(json.dumps(trained_head_meta(head), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "head.json")


def add_head_version(
    repo: Path, head: HeadSpec, params: Params, *, branch: Branch | None = None
) -> HeadSpec:
    """Store `params` as the next version of `head` in `repo` and point the manifest at it.

    `head.version` and `head.weights_file` are ignored and set here. The manifest is read
    again (verified) just before writing, so the version is the latest one. With `branch`
    (a fine-tuned head's own branch, already written), the encoder gains that part, and
    must be for the version that is written. Heads' branches that no head reads any more
    leave the manifest (their files stay, as older heads' weights do).
    """
    manifest = load_manifest(repo)
    if head.kind not in TRAINED:
        trained = ", ".join(TRAINED)
        raise HeadNameError(f"only {trained} heads are trained, not {str(head.kind)!r}")
    version = next_version(manifest, head.name, head.kind)
    if branch is not None and branch.version != version:
        raise ModelRepoError(
            f"another `head train` wrote version {version - 1} of {head.name!r} meanwhile; "
            "rerun to train the next version"
        )
    rel = f"heads/{head.name}/{version}/weights.npz"
    save_params(repo / rel, params)
    spec = replace(head, version=str(version), weights_file=rel)
    heads = [h for h in manifest.heads if h.name != head.name]
    position = next((i for i, h in enumerate(manifest.heads) if h.name == head.name), len(heads))
    heads.insert(position, spec)
    live = {manifest.encoder.model_file, manifest.encoder.tokenizer_file}
    live |= {h.weights_file for h in heads if h.weights_file}
    checksums = {k: v for k, v in manifest.checksums.items() if k in live}
    checksums[rel] = sha256_file(repo / rel)
    encoder = manifest.encoder
    read = {h.features for h in heads}
    kept = {n: encoder.branch_files(n) for n in encoder.user_branches() if n in read}
    if branch is not None:
        kept[branch.name] = branch.files
        encoder = encoder.with_layer_counts(branch.encoder_layers)
    if encoder.parts:
        encoder = encoder.with_branches(kept)
    write_manifest(
        repo, replace(manifest, encoder=encoder, heads=tuple(heads), checksums=checksums)
    )
    return spec


@dataclass(frozen=True)
class Branch:
    """A head's own branch, its files already in the repository, to list in the manifest
    as part `name` with the head's `version`."""

    version: int
    name: str
    files: dict[str, PartFile]  # fp32 and each variant's
    encoder_layers: int  # of the whole encoder, to record the built parts' where missing


def format_heads(manifest: Manifest) -> str:
    """A table of the repository's heads: name, kind, version, label count, the branch it
    reads with its cost (share of a full encoder pass), metrics."""
    rows = [("NAME", "KIND", "VERSION", "LABELS", "FEATURES (COST)", "METRICS")]
    for h in manifest.heads:
        metrics = " ".join(f"{k}={_number(v)}" for k, v in sorted(h.metrics.items()))
        cost = manifest.encoder.branch_cost(h.features)
        features = f"{h.features} ({cost:.2f})" if cost else h.features
        rows.append((h.name, h.kind, h.version, str(len(h.labels)), features, metrics or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)), row[5]])
        for row in rows
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"
