"""Request checks that run before anything is queued; each failure says what to fix."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import InvalidArgument, NotFound, Unavailable
from gateway.settings import GatewaySettings
from taskmux.modelrepo.manifest import HeadSpec, Manifest


def check_texts(texts: Sequence[str], settings: GatewaySettings) -> tuple[str, ...]:
    """The texts, if their number and each one's length are within the limits."""
    if not texts:
        raise InvalidArgument("texts is empty: send at least one text")
    if len(texts) > settings.max_texts_per_request:
        raise InvalidArgument(
            f"texts has {len(texts)} items; at most {settings.max_texts_per_request} are "
            "allowed per request: split it into several requests"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"texts[{i}] is empty or only whitespace: send real text")
        if len(text) > settings.max_text_chars:
            raise InvalidArgument(
                f"texts[{i}] has {len(text)} characters; at most {settings.max_text_chars} "
                "are allowed: shorten or split it"
            )
    return tuple(texts)


def check_head(name: str, kind: str, catalog: Manifest | None, rpc: str) -> HeadSpec:
    """The named head, if the deployment serves it and it is of `kind`."""
    if not name:
        raise InvalidArgument("head is empty: name a head (ListTasks lists them)")
    if catalog is None:
        raise Unavailable("no worker has registered its heads yet: start a worker, then retry")
    head = catalog.head(name)
    if head is None:
        served = ", ".join(sorted(h.name for h in catalog.heads if h.kind == kind)) or "none"
        raise NotFound(f"head {name!r} is not served; {kind} heads served: {served}")
    if head.kind != kind:
        raise InvalidArgument(f"head {name!r} is a {head.kind} head; {rpc} needs a {kind} head")
    return head


def check_top_k(top_k: int, head: HeadSpec) -> int:
    """top_k with 0 read as 1 and values past the label count capped to it."""
    if top_k < 0:
        raise InvalidArgument(f"top_k is {top_k}; it must be 0 (meaning 1) or more")
    return min(max(top_k, 1), len(head.labels))
