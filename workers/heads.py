"""Task heads: small computations on top of the shared encoder's output.

Every head takes the batch's L2-normalised sentence vectors (one row per text) and
returns one output row per text. New kinds plug in by adding a class and an entry in
`HEAD_TYPES`; the worker never special-cases a head by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from taskmux.modelrepo.manifest import (
    KIND_CLASSIFICATION,
    KIND_EMBEDDING,
    HeadSpec,
    Manifest,
    ModelRepoError,
)
from workers.encoder import Floats


class Head(Protocol):
    """What every head offers the worker."""

    spec: HeadSpec

    def apply(self, vectors: Floats) -> Floats:
        """One output row per input row."""
        ...


class EmbeddingHead:
    """Returns the normalised sentence vectors themselves."""

    def __init__(self, spec: HeadSpec, repo: Path, dimension: int) -> None:
        self.spec = spec

    def apply(self, vectors: Floats) -> Floats:
        return vectors


def load_mlp(repo: Path, spec: HeadSpec, dimension: int) -> dict[str, Floats]:
    """A head's weights: `weight` [labels, in], `bias` [labels], and optionally one ReLU
    hidden layer `hidden_weight` [hidden, dimension], `hidden_bias` [hidden]."""
    try:
        with np.load(repo / spec.weights_file) as data:
            params = {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
    except (OSError, KeyError, ValueError) as err:
        raise ModelRepoError(f"head {spec.name}: cannot read {spec.weights_file}: {err}") from err
    labels = len(spec.labels)
    width = dimension
    if "hidden_weight" in params:
        hidden = params["hidden_weight"].shape[0]
        if params["hidden_weight"].shape != (hidden, dimension) or params.get(
            "hidden_bias", np.empty(0)
        ).shape != (hidden,):
            raise ModelRepoError(
                f"head {spec.name}: hidden layer does not fit a {dimension}-d encoder"
            )
        width = hidden
    weight, bias = params.get("weight"), params.get("bias")
    if weight is None or bias is None or weight.shape != (labels, width) or bias.shape != (labels,):
        raise ModelRepoError(
            f"head {spec.name}: weights do not match {labels} labels on a "
            f"{dimension}-dimension encoder"
        )
    return params


def mlp_logits(x: Floats, params: dict[str, Floats]) -> Floats:
    """Logits of a linear or one-hidden-layer head; training uses the same function."""
    if "hidden_weight" in params:
        x = np.maximum(x @ params["hidden_weight"].T + params["hidden_bias"], 0.0)
    logits: Floats = x @ params["weight"].T + params["bias"]
    return logits


def softmax(logits: Floats) -> Floats:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: Floats = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


class LinearClassifierHead:
    """Probabilities = softmax(mlp_logits(sentence vector)); linear or one hidden layer."""

    def __init__(self, spec: HeadSpec, repo: Path, dimension: int) -> None:
        self.spec = spec
        self.params = load_mlp(repo, spec, dimension)

    def apply(self, vectors: Floats) -> Floats:
        return softmax(mlp_logits(vectors, self.params))


HEAD_TYPES: dict[str, type[EmbeddingHead] | type[LinearClassifierHead]] = {
    KIND_EMBEDDING: EmbeddingHead,
    KIND_CLASSIFICATION: LinearClassifierHead,
}


def load_heads(repo: Path, manifest: Manifest) -> dict[str, Head]:
    """Every head of the manifest, loaded and checked against the encoder's dimension."""
    dimension = manifest.encoder.dimension
    return {h.name: HEAD_TYPES[h.kind](h, repo, dimension) for h in manifest.heads}
