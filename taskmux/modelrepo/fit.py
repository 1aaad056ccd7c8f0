"""Fit head weights on frozen encoder vectors: softmax regression or a one-hidden-layer MLP.

Both fitters standardise the features per dimension while fitting and fold the scaling back
into the weights, so the result is a plain `model.heads` parameter dict (`weight`, `bias`,
and for an MLP `hidden_weight`, `hidden_bias`) that `mlp_logits` applies to raw features.
Results depend only on the inputs and the seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from model.heads_math import mlp_logits

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
Params = dict[str, Floats]


@dataclass(frozen=True)
class FitOptions:
    """Hyperparameters of one fit; `hidden` 0 means softmax regression."""

    hidden: int = 0
    l2: float = 1e-3  # penalty on the squared weights (on standardised features)
    epochs: int = 40
    batch_size: int = 512
    learning_rate: float = 0.01
    dropout: float = 0.0  # on the hidden layer, MLP only
    seed: int = 0


def fit_head(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    num_classes: int,
    options: FitOptions = FitOptions(),
    *,
    sample_weight: npt.ArrayLike | None = None,
) -> Params:
    """Fit a head by minibatch Adam with a cosine-decayed learning rate; returns its params."""
    if options.hidden <= 0:
        weight, bias = fit_softmax_regression(
            features,
            labels,
            num_classes,
            l2=options.l2,
            epochs=options.epochs,
            batch_size=options.batch_size,
            learning_rate=options.learning_rate,
            sample_weight=sample_weight,
            seed=options.seed,
        )
        return {"weight": weight, "bias": bias}
    return _fit_mlp(features, labels, num_classes, options, sample_weight)


def fit_softmax_regression(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    num_classes: int,
    *,
    l2: float = 1e-3,
    epochs: int = 40,
    batch_size: int = 512,
    learning_rate: float = 0.01,
    sample_weight: npt.ArrayLike | None = None,
    seed: int = 0,
) -> tuple[Floats, Floats]:
    """Multinomial logistic regression; returns (weight [C, D], bias [C])."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    _check_problem(x, y, num_classes)
    weights = _sample_weights(sample_weight, y)
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / scale
    onehot = np.eye(num_classes)[y.astype(np.int64)]

    w = np.zeros((num_classes, x.shape[1]))
    b = np.zeros(num_classes)
    adam = Adam([w, b], learning_rate)
    rng = np.random.default_rng(seed)
    steps = epochs * -(-len(y) // batch_size)
    for step, rows in enumerate(minibatches(len(y), batch_size, epochs, rng)):
        total = weights[rows].sum()
        if total <= 0:
            continue
        error = (softmax64(z[rows] @ w.T + b) - onehot[rows]) * weights[rows, None]
        grad_w = error.T @ z[rows] / total + l2 * w
        grad_b = error.sum(axis=0) / total
        adam.step([grad_w, grad_b], 0.5 * (1 + np.cos(np.pi * step / steps)))

    weight = w / scale
    bias = b - weight @ mean
    return weight.astype(np.float32), bias.astype(np.float32)


def _fit_mlp(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    num_classes: int,
    options: FitOptions,
    sample_weight: npt.ArrayLike | None,
) -> Params:
    """One ReLU hidden layer, softmax output, He initialisation, optional dropout."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    _check_problem(x, y, num_classes)
    weights = _sample_weights(sample_weight, y).astype(np.float32)
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    scale = np.maximum(x.std(axis=0, dtype=np.float64), 1e-6).astype(np.float32)
    rng = np.random.default_rng(options.seed)
    dim, hidden = x.shape[1], options.hidden
    w1 = (rng.normal(size=(hidden, dim)) * np.sqrt(2.0 / dim)).astype(np.float32)
    b1 = np.zeros(hidden, dtype=np.float32)
    w2 = (rng.normal(size=(num_classes, hidden)) * np.sqrt(1.0 / hidden)).astype(np.float32)
    b2 = np.zeros(num_classes, dtype=np.float32)
    adam = Adam([w1, b1, w2, b2], options.learning_rate)
    keep = 1.0 - options.dropout
    steps = options.epochs * -(-len(y) // options.batch_size)
    for step, rows in enumerate(minibatches(len(y), options.batch_size, options.epochs, rng)):
        total = float(weights[rows].sum())
        if total <= 0:
            continue
        z = (x[rows] - mean) / scale
        h = np.maximum(z @ w1.T + b1, 0.0)
        if options.dropout > 0:
            h *= (rng.random(h.shape) < keep).astype(np.float32) / keep
        probs = softmax64(h @ w2.T + b2).astype(np.float32)
        probs[np.arange(len(rows)), y[rows]] -= 1.0
        error = probs * (weights[rows, None] / total)
        grad_w2 = error.T @ h + options.l2 * w2
        grad_b2 = error.sum(axis=0)
        back = (error @ w2) * (h > 0)
        grad_w1 = back.T @ z + options.l2 * w1
        grad_b1 = back.sum(axis=0)
        lr_scale = 0.5 * (1 + np.cos(np.pi * step / steps))
        adam.step([grad_w1, grad_b1, grad_w2, grad_b2], lr_scale)

    hidden_weight = w1 / scale
    return {
        "hidden_weight": hidden_weight.astype(np.float32),
        "hidden_bias": (b1 - hidden_weight @ mean).astype(np.float32),
        "weight": w2,
        "bias": b2,
    }


def predict(features: npt.ArrayLike, params: Params) -> Ints:
    """The most probable class of each row under the head."""
    logits = mlp_logits(np.asarray(features, dtype=np.float32), params)
    predicted: Ints = logits.argmax(axis=1).astype(np.int64)
    return predicted


def accuracy_of(features: npt.ArrayLike, labels: npt.ArrayLike, params: Params) -> float:
    """Share of rows whose most probable class under the head is the label."""
    y = np.asarray(labels)
    if len(y) == 0:
        return float("nan")
    return float(np.mean(predict(features, params) == y))


def accuracy(features: npt.ArrayLike, labels: npt.ArrayLike, weight: Floats, bias: Floats) -> float:
    """`accuracy_of` for a linear head given as (weight, bias)."""
    return accuracy_of(features, labels, {"weight": weight, "bias": bias})


def softmax64(logits: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Row-wise softmax in float64 (for fitting; serving uses `model.heads.softmax`)."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: npt.NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def minibatches(
    n: int, batch_size: int, epochs: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.intp]]:
    """Row indices of each minibatch: a fresh permutation per epoch."""
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


class Adam:
    """Adam (Kingma & Ba 2015) updating a list of arrays in place."""

    def __init__(self, params: list[npt.NDArray[Any]], learning_rate: float) -> None:
        self.params = params
        self.learning_rate = learning_rate
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[npt.NDArray[Any]], lr_scale: float) -> None:
        """One update with the learning rate scaled by `lr_scale`."""
        self.t += 1
        beta1, beta2 = 0.9, 0.999
        lr = self.learning_rate * lr_scale
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * g * g
            m_hat = m / (1 - beta1**self.t)
            v_hat = v / (1 - beta2**self.t)
            p -= (lr * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(p.dtype)


def _sample_weights(sample_weight: npt.ArrayLike | None, y: npt.NDArray[Any]) -> npt.NDArray[Any]:
    weights = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if weights.shape != y.shape or not np.all(weights >= 0) or weights.sum() <= 0:
        raise ValueError("sample_weight must be non-negative, one per row, not all zero")
    return weights


def _check_problem(x: npt.NDArray[Any], y: npt.NDArray[Any], num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"features {x.shape} and labels {y.shape} do not make a training set")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be integers in [0, {num_classes})")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinity")
