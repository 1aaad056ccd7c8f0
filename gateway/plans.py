"""From a validated API request to the job a worker runs, and back.

Each `plan_*` function validates one request type and returns a `Plan`: what to queue
and how to decode the worker's reply. Unary RPCs and Pipeline streams share them, so a
task gets the same checks and the same errors whichever way it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message
from taskmux_api.v1 import taskmux_pb2 as pb

from gateway.errors import InvalidArgument
from gateway.settings import GatewaySettings
from gateway.validation import (
    check_candidates,
    check_head,
    check_labels,
    check_texts,
    check_top_k,
)
from model.manifest import (
    KIND_CLASSIFICATION,
    KIND_EMBEDDING,
    KIND_TOKEN,
    Manifest,
)
from model.manifest import KIND_SIMILARITY as HEAD_SIMILARITY
from model.manifest import KIND_ZERO_SHOT as HEAD_ZERO_SHOT
from router.messages import (
    KIND_CLASSIFY,
    KIND_EMBED,
    KIND_ENTITIES,
    KIND_SIMILARITY,
    KIND_ZERO_SHOT,
)

EMBED_HEAD = "embed"
ENTITIES_HEAD = "entities"
SIMILARITY_HEAD = "similarity"
ZERO_SHOT_HEAD = "zero-shot"


@dataclass(frozen=True)
class Plan:
    """A validated request: the job to queue and the decoder of its reply body."""

    kind: str
    head: str
    texts: tuple[str, ...]
    decode: Callable[[bytes], Message]
    top_k: int = 1
    params: dict[str, Any] = field(default_factory=dict)


def plan_embed(
    request: pb.EmbedRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """Embed: the built-in embedding head, which every worker serves."""
    texts = check_texts(request.texts, settings)
    if catalog is not None:
        check_head(EMBED_HEAD, KIND_EMBEDDING, catalog, "Embed")
    return Plan(KIND_EMBED, EMBED_HEAD, texts, pb.EmbedResponse.FromString)


def plan_classify(
    request: pb.ClassifyRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """Classify: one classification head."""
    texts = check_texts(request.texts, settings)
    head = check_head(request.head, KIND_CLASSIFICATION, catalog, "Classify")
    top_k = check_top_k(request.top_k, head)
    return Plan(KIND_CLASSIFY, head.name, texts, pb.ClassifyResponse.FromString, top_k)


def plan_entities(
    request: pb.ExtractEntitiesRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """ExtractEntities: one token-classification head ("entities" by default)."""
    texts = check_texts(request.texts, settings)
    head = check_head(request.head or ENTITIES_HEAD, KIND_TOKEN, catalog, "ExtractEntities")
    return Plan(KIND_ENTITIES, head.name, texts, pb.ExtractEntitiesResponse.FromString)


def plan_similarity(
    request: pb.SimilarityRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """Similarity: the query and candidates go through one encoder pass."""
    texts = check_candidates(request.query, request.candidates, settings)
    if request.top_k < 0:
        raise InvalidArgument(f"top_k is {request.top_k}; it must be 0 (no ranking) or more")
    head = check_head(SIMILARITY_HEAD, HEAD_SIMILARITY, catalog, "Similarity")
    top_k = min(request.top_k, len(texts) - 1)
    return Plan(KIND_SIMILARITY, head.name, texts, pb.SimilarityResponse.FromString, top_k)


def plan_zero_shot(
    request: pb.ZeroShotClassifyRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """ZeroShotClassify: texts plus the caller's labels (label sentences are cached)."""
    texts = check_texts(request.texts, settings)
    labels = check_labels(request.labels, request.hypothesis_template, settings)
    head = check_head(ZERO_SHOT_HEAD, HEAD_ZERO_SHOT, catalog, "ZeroShotClassify")
    params = {"labels": labels, "template": request.hypothesis_template}
    decode = pb.ZeroShotClassifyResponse.FromString
    return Plan(KIND_ZERO_SHOT, head.name, texts, decode, len(labels), params)
