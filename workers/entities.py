"""Entity spans from a token-classification head's per-token probabilities.

Labels are BIO tags ("O", "B-PER", "I-PER", ...). Each word (as the tokenizer's
pre-tokenizer splits them) takes the tag of its first word piece; consecutive words
tagged B-X, I-X, I-X form one X entity. Offsets come from the tokenizer and are code
points into the caller's original string, so `text[start:end]` is the entity's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding

from workers.encoder import Floats
from workers.heads_math import mlp_logits, softmax


@dataclass(frozen=True)
class EntitySpan:
    """One entity: its text, type, code-point offsets and confidence."""

    text: str
    label: str
    start: int
    end: int
    score: float


def token_probs(states: Floats, params: dict[str, Floats]) -> Floats:
    """[tokens, labels] probabilities for every token state."""
    return softmax(mlp_logits(states, params))


def decode_entities(
    probs: Floats, encoding: Encoding, text: str, labels: Sequence[str]
) -> list[EntitySpan]:
    """The entities in `text`, in order of appearance."""
    words = _first_pieces(encoding)
    spans: list[EntitySpan] = []
    current: tuple[str, int, int, list[float]] | None = None  # (type, start, end, scores)
    for first, last in words:
        tag = labels[int(np.argmax(probs[first]))]
        score = float(np.max(probs[first]))
        start, end = encoding.offsets[first][0], encoding.offsets[last][1]
        prefix, _, kind = tag.partition("-")
        if prefix == "I" and current is not None and current[0] == kind:
            current = (kind, current[1], end, [*current[3], score])
            continue
        if current is not None:
            spans.append(_span(text, current))
            current = None
        if prefix in ("B", "I") and kind:
            current = (kind, start, end, [score])
    if current is not None:
        spans.append(_span(text, current))
    return spans


def _first_pieces(encoding: Encoding) -> list[tuple[int, int]]:
    """(first token, last token) of each word, skipping special tokens."""
    words: list[tuple[int, int]] = []
    previous = None
    for i, (word, special) in enumerate(
        zip(encoding.word_ids, encoding.special_tokens_mask, strict=True)
    ):
        if special or word is None:
            previous = None
            continue
        if word == previous and words:
            words[-1] = (words[-1][0], i)
        else:
            words.append((i, i))
        previous = word
    return words


def _span(text: str, current: tuple[str, int, int, list[float]]) -> EntitySpan:
    kind, start, end, scores = current
    return EntitySpan(text[start:end], kind, start, end, float(np.mean(scores)))
