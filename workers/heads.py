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


class LinearClassifierHead:
    """Softmax regression: probabilities = softmax(vectors @ weight.T + bias)."""

    def __init__(self, spec: HeadSpec, repo: Path, dimension: int) -> None:
        self.spec = spec
        try:
            with np.load(repo / spec.weights_file) as data:
                self.weight = np.asarray(data["weight"], dtype=np.float32)
                self.bias = np.asarray(data["bias"], dtype=np.float32)
        except (OSError, KeyError, ValueError) as err:
            raise ModelRepoError(
                f"head {spec.name}: cannot read {spec.weights_file}: {err}"
            ) from err
        expected = (len(spec.labels), dimension)
        if self.weight.shape != expected or self.bias.shape != (len(spec.labels),):
            raise ModelRepoError(
                f"head {spec.name}: weight {self.weight.shape} / bias {self.bias.shape} do not "
                f"match {len(spec.labels)} labels on a {dimension}-dimension encoder"
            )

    def apply(self, vectors: Floats) -> Floats:
        logits = vectors @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        probs: Floats = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
        return probs


HEAD_TYPES: dict[str, type[EmbeddingHead] | type[LinearClassifierHead]] = {
    KIND_EMBEDDING: EmbeddingHead,
    KIND_CLASSIFICATION: LinearClassifierHead,
}


def load_heads(repo: Path, manifest: Manifest) -> dict[str, Head]:
    """Every head of the manifest, loaded and checked against the encoder's dimension."""
    dimension = manifest.encoder.dimension
    return {h.name: HEAD_TYPES[h.kind](h, repo, dimension) for h in manifest.heads}
