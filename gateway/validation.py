"""Request checks that run before anything is queued; each failure says what to fix."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import META_MAX_CHARS, InvalidArgument, NotFound, Unavailable, is_metadata_safe
from gateway.settings import GatewaySettings
from model.manifest import HeadSpec, Manifest


def check_texts(texts: Sequence[str], settings: GatewaySettings) -> tuple[str, ...]:
    """The texts, if their number and each one's length are within the limits."""
    if not texts:
        raise InvalidArgument("texts is empty: send at least one text")
    if len(texts) > settings.max_texts_per_request:
        raise InvalidArgument(
            f"texts has {len(texts)} items; at most {settings.max_texts_per_request} are "
            "allowed per request: split it into several requests"
        )
    _check_each("texts", texts, settings)
    return tuple(texts)


def check_request_meta(request_id: str, idempotency_key: str) -> None:
    """The request metadata fields, when set, are short printable ASCII."""
    for name, value in (("request_id", request_id), ("idempotency_key", idempotency_key)):
        if value and not is_metadata_safe(value):
            raise InvalidArgument(
                f"{name} must be at most {META_MAX_CHARS} printable ASCII characters "
                f"(space to '~'); got {len(value)} characters"
            )


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


def check_candidates(
    query: str, candidates: Sequence[str], settings: GatewaySettings
) -> tuple[str, ...]:
    """(query, *candidates) if the query and every candidate are valid texts."""
    if not query.strip():
        raise InvalidArgument("query is empty: send the text to compare candidates with")
    if len(query) > settings.max_text_chars:
        raise InvalidArgument(
            f"query has {len(query)} characters; at most {settings.max_text_chars} are allowed"
        )
    if not candidates:
        raise InvalidArgument("candidates is empty: send at least one candidate")
    if len(candidates) > settings.max_candidates:
        raise InvalidArgument(
            f"candidates has {len(candidates)} items; at most {settings.max_candidates} are "
            "allowed: split them into several requests"
        )
    _check_each("candidates", candidates, settings)
    return (query, *candidates)


def check_labels(labels: Sequence[str], template: str, settings: GatewaySettings) -> list[str]:
    """The zero-shot labels, if 2+ distinct non-empty ones within limits, and the template."""
    if len(labels) < 2:
        raise InvalidArgument(f"labels has {len(labels)} items; send at least 2 to choose from")
    if len(labels) > settings.max_labels:
        raise InvalidArgument(
            f"labels has {len(labels)} items; at most {settings.max_labels} are allowed"
        )
    _check_each("labels", labels, settings)
    seen: set[str] = set()
    for i, label in enumerate(labels):
        if label in seen:
            raise InvalidArgument(f"labels[{i}] {label!r} is a duplicate: labels must differ")
        seen.add(label)
    if template and "{}" not in template:
        raise InvalidArgument('hypothesis_template must contain "{}" where the label goes')
    if len(template) > settings.max_text_chars:
        raise InvalidArgument("hypothesis_template is too long")
    return list(labels)


def check_heads(
    names: Sequence[str], kinds: Sequence[str], catalog: Manifest | None, settings: GatewaySettings
) -> list[HeadSpec]:
    """The distinct named heads, each served and of one of `kinds`."""
    if not names:
        raise InvalidArgument("heads is empty: name at least one head (ListTasks lists them)")
    if len(names) > settings.max_heads_per_request:
        raise InvalidArgument(
            f"heads has {len(names)} items; at most {settings.max_heads_per_request} are allowed"
        )
    if len(set(names)) != len(names):
        raise InvalidArgument("heads has a duplicate: name each head once")
    specs = []
    for name in names:
        if catalog is not None and (spec := catalog.head(name)) is not None:
            if spec.kind not in kinds:
                raise InvalidArgument(
                    f"head {name!r} is a {spec.kind} head; Analyze takes {', '.join(kinds)} heads"
                )
            specs.append(spec)
        else:
            specs.append(check_head(name, kinds[0], catalog, "Analyze"))
    return specs


def _check_each(field: str, items: Sequence[str], settings: GatewaySettings) -> None:
    for i, item in enumerate(items):
        if not item.strip():
            raise InvalidArgument(f"{field}[{i}] is empty or only whitespace")
        if len(item) > settings.max_text_chars:
            raise InvalidArgument(
                f"{field}[{i}] has {len(item)} characters; at most {settings.max_text_chars} "
                "are allowed"
            )
