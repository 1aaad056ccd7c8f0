"""Entity tags of a token-classification head: "B-PER", "I-PER", "PER" (IO scheme) or "O".

No numpy or tokenizers here: the gateway reads a head's entity types from its catalog
labels to check what Anonymize may replace, and the gateway image has neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

OUTSIDE: Final = "O"


def split_tag(label: str) -> tuple[str, str | None]:
    """("B" | "I" | "", entity type), or ("", None) for the outside label."""
    if label == OUTSIDE or not label:
        return "", None
    if label[:2] in ("B-", "I-") and len(label) > 2:
        return label[0], label[2:]
    return "", label


def entity_types(labels: Iterable[str]) -> tuple[str, ...]:
    """The entity types that a head's labels tag, in order of first appearance."""
    types = (split_tag(label)[1] for label in labels)
    return tuple(dict.fromkeys(t for t in types if t is not None))
