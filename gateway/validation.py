"""Request checks that run before anything is queued; each failure says what to fix."""

from __future__ import annotations

from collections.abc import Sequence

from taskmux_api.v1 import taskmux_pb2 as pb

from gateway.errors import META_MAX_CHARS, InvalidArgument, NotFound, Unavailable, is_metadata_safe
from gateway.settings import GatewaySettings
from model.anonymize import DEFAULT_LABELS, Style
from model.manifest import HeadSpec, Manifest
from model.tags import entity_types

# An unset style is the placeholder one; a number not listed here is a newer client's.
STYLES: dict[int, Style] = {
    pb.ANONYMIZE_STYLE_UNSPECIFIED: Style.PLACEHOLDER,
    pb.ANONYMIZE_STYLE_PLACEHOLDER: Style.PLACEHOLDER,
    pb.ANONYMIZE_STYLE_PSEUDONYM: Style.PSEUDONYM,
}


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


def check_style(style: int) -> Style:
    """The anonymize style of an AnonymizeStyle number this server knows."""
    known = STYLES.get(style)
    if known is None:
        names = ", ".join(f"{n} ({v})" for n, v in pb.AnonymizeStyle.items() if v in STYLES)
        raise InvalidArgument(f"style {style} is not an AnonymizeStyle this server knows: {names}")
    return known


def check_entity_labels(labels: Sequence[str], head: HeadSpec) -> list[str]:
    """The distinct entity labels to replace, each one that `head` tags; none means those
    of PER, ORG and LOC it tags."""
    allowed = entity_types(head.labels)
    listed = ", ".join(allowed) or "none"
    if not labels:
        chosen: list[str] = [label for label in DEFAULT_LABELS if label in allowed]
        if not chosen:
            raise InvalidArgument(
                f"labels is empty and head {head.name!r} tags none of "
                f"{', '.join(DEFAULT_LABELS)}: name some of its labels: {listed}"
            )
        return chosen
    for i, label in enumerate(labels):
        if label not in allowed:
            raise InvalidArgument(
                f"labels[{i}] {label[:40]!r} is not an entity label of head {head.name!r}; "
                f"its labels: {listed}"
            )
        if label in labels[:i]:
            raise InvalidArgument(f"labels[{i}] {label!r} is a duplicate: name each label once")
    return list(labels)


def _check_each(field: str, items: Sequence[str], settings: GatewaySettings) -> None:
    for i, item in enumerate(items):
        if not item.strip():
            raise InvalidArgument(f"{field}[{i}] is empty or only whitespace")
        if len(item) > settings.max_text_chars:
            raise InvalidArgument(
                f"{field}[{i}] has {len(item)} characters; at most {settings.max_text_chars} "
                "are allowed"
            )
