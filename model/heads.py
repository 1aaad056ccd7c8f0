"""Task heads: small computations on top of the shared encoder's output.

Sentence-level heads read the batch's L2-normalised sentence vectors; token heads read the
per-token states of the same encoder pass. A new head kind (taskmux_api/kinds.py) plugs in
by adding a class and an entry in `HEAD_TYPES`; the worker never special-cases a head by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from taskmux_api.kinds import HeadKind
from tokenizers import Encoding

from model.encoder import Floats
from model.entities import EntitySpan, decode_entities, token_probs
from model.heads_math import mlp_logits as mlp_logits  # re-exported for trainers
from model.heads_math import softmax as softmax
from model.manifest import HeadSpec, Manifest, ModelRepoError


class Head(Protocol):
    """What every head offers the worker: its spec. Each kind adds its own method."""

    spec: HeadSpec


class EmbeddingHead:
    """The normalised sentence vectors themselves."""

    def __init__(self, spec: HeadSpec, repo: Path, dimension: int) -> None:
        self.spec = spec

    def apply(self, vectors: Floats) -> Floats:
        """One output row per input row."""
        return vectors


class SimilarityHead:
    """Cosine of each candidate's vector with the query's."""

    def __init__(self, spec: HeadSpec, repo: Path, dimension: int) -> None:
        self.spec = spec

    def scores(self, query: Floats, candidates: Floats) -> Floats:
        """One score per candidate row (the vectors are unit length)."""
        scores: Floats = candidates @ query
        return scores


class ZeroShotHead:
    """Labels as sentences: softmax over the cosine of text and label-sentence vectors."""

    # Cosines of one encoder lie close together; dividing by this spreads them into
    # usable probabilities (the scale a contrastively trained encoder uses).
    TEMPERATURE = 0.05
    DEFAULT_TEMPLATE = "This text is about {}."

    def __init__(self, spec: HeadSpec, repo: Path, dimension: int) -> None:
        self.spec = spec

    def apply(self, texts: Floats, labels: Floats) -> Floats:
        """[texts, labels] probabilities."""
        return softmax((texts @ labels.T) / self.TEMPERATURE)


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


class LinearClassifierHead:
    """Probabilities = softmax(mlp_logits(sentence vector)); linear or one hidden layer."""

    def __init__(self, spec: HeadSpec, repo: Path, dimension: int) -> None:
        self.spec = spec
        self.params = load_mlp(repo, spec, dimension)

    def apply(self, vectors: Floats) -> Floats:
        """[texts, labels] probabilities."""
        return softmax(mlp_logits(vectors, self.params))


# One text for a token head: its per-token states, its encoding and the text itself.
TokenInput = tuple[Floats, Encoding, str]


class TokenClassifierHead:
    """Entity spans from per-token states of the same encoder pass."""

    def __init__(self, spec: HeadSpec, repo: Path, dimension: int) -> None:
        self.spec = spec
        self.params = load_mlp(repo, spec, dimension)

    def entities(self, states: Floats, encoding: Encoding, text: str) -> list[EntitySpan]:
        """The spans found in `text`, whose encoding and token states are given."""
        probs = token_probs(states, self.params)
        return decode_entities(probs, encoding, text, self.spec.labels)

    def entities_of(self, texts: Sequence[TokenInput]) -> list[list[EntitySpan]]:
        """The spans of several texts, the head applied once to all their tokens: a call
        per text costs more in numpy's per-call overhead than in arithmetic."""
        if not texts:
            return []
        probs = token_probs(np.concatenate([states for states, _, _ in texts]), self.params)
        ends = np.cumsum([len(states) for states, _, _ in texts])
        return [
            decode_entities(probs[end - len(states) : end], encoding, text, self.spec.labels)
            for (states, encoding, text), end in zip(texts, ends, strict=True)
        ]


HeadType = type[
    EmbeddingHead | SimilarityHead | ZeroShotHead | LinearClassifierHead | TokenClassifierHead
]
HEAD_TYPES: dict[HeadKind, HeadType] = {
    HeadKind.EMBEDDING: EmbeddingHead,
    HeadKind.SIMILARITY: SimilarityHead,
    HeadKind.ZERO_SHOT: ZeroShotHead,
    HeadKind.CLASSIFICATION: LinearClassifierHead,
    HeadKind.TOKEN_CLASSIFICATION: TokenClassifierHead,
}


def load_heads(repo: Path, manifest: Manifest) -> dict[str, Head]:
    """Every head of the manifest, loaded and checked against the encoder's dimension."""
    dimension = manifest.encoder.dimension
    return {h.name: HEAD_TYPES[h.kind](h, repo, dimension) for h in manifest.heads}
