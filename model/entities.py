"""Entity spans from a token-classification head: per-token probabilities, then BIO decoding.

Decoding works on *words* as the tokenizer sees them (runs of word pieces with one word id:
the BERT pre-tokenizer splits on whitespace and punctuation), so a span never ends inside a
word, and "Germany," yields "Germany". A word's tag is its first piece's most probable label;
the later pieces only widen the span. Tags follow BIO: `B-X` opens an entity of type X, `I-X`
continues an open X (or opens one when none is open: a stray I- is kept, not dropped), `O`
closes. Labels without a B-/I- prefix (an IO scheme) continue an entity of the same type.
Spans are code-point offsets into the text the encoding was made from, so
`text[start:end] == span.text` holds for any input, accents, CJK and emoji included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding

from model.encoder import Floats, l2_normalize
from model.heads_math import mlp_logits, softmax
from model.tags import split_tag


@dataclass(frozen=True)
class EntitySpan:
    """One entity: its text, type (no B-/I- prefix), code-point span and mean probability."""

    text: str
    label: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class _Word:
    start: int
    end: int
    first_token: int


def token_probs(states: Floats, params: dict[str, Floats]) -> Floats:
    """Label probabilities [tokens, labels] of raw token states (L2-normalised per token)."""
    if states.ndim != 2:
        raise ValueError(f"token states must be [tokens, dim], got shape {states.shape}")
    return softmax(mlp_logits(l2_normalize(np.asarray(states, dtype=np.float32)), params))


def decode_entities(
    probs: Floats, encoding: Encoding, text: str, labels: Sequence[str]
) -> list[EntitySpan]:
    """The entity spans of `text`, given its encoding and the head's probabilities."""
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"probabilities {probs.shape} do not match {len(labels)} labels")
    if probs.shape[0] != len(encoding.ids):
        raise ValueError(f"{probs.shape[0]} probability rows for {len(encoding.ids)} tokens")
    words = _words(encoding, len(text))
    spans: list[EntitySpan] = []
    open_type: str | None = None
    members: list[tuple[_Word, float]] = []

    def close() -> None:
        if open_type is not None and members:
            start, end = members[0][0].start, members[-1][0].end
            score = float(np.clip(np.mean([p for _, p in members]), 0.0, 1.0))
            spans.append(EntitySpan(text[start:end], open_type, start, end, score))

    for word in words:
        row = probs[word.first_token]
        best = int(np.argmax(row))
        prefix, kind = split_tag(labels[best])
        if kind is None:
            close()
            open_type, members = None, []
        elif prefix == "B" or kind != open_type:
            close()
            open_type, members = kind, [(word, float(row[best]))]
        else:
            members.append((word, float(row[best])))
    close()
    return spans


def _words(encoding: Encoding, length: int) -> list[_Word]:
    """Runs of non-special tokens sharing a word id, with their character extent."""
    words: list[_Word] = []
    last_id: int | None = None
    special = encoding.special_tokens_mask
    for index, (word_id, (start, end)) in enumerate(
        zip(encoding.word_ids, encoding.offsets, strict=True)
    ):
        if special[index] or word_id is None or not 0 <= start < end <= length:
            last_id = None
            continue
        if word_id == last_id and words:
            previous = words[-1]
            words[-1] = _Word(previous.start, max(previous.end, end), previous.first_token)
        else:
            words.append(_Word(start, end, index))
        last_id = word_id
    return words
