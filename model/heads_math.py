"""The arithmetic of trained heads, shared by serving and training."""

from __future__ import annotations

import numpy as np

from model.encoder import Floats


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
