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
from taskmux_api.kinds import TASKS, TaskKind, TaskSpec, head_kinds_of
from taskmux_api.v1 import taskmux_pb2 as pb

from gateway.errors import InvalidArgument
from gateway.settings import GatewaySettings
from gateway.validation import (
    check_candidates,
    check_entity_labels,
    check_head,
    check_labels,
    check_style,
    check_texts,
    check_top_k,
)
from model.anonymize import Style
from model.manifest import HeadSpec, Manifest


@dataclass(frozen=True)
class Plan:
    """A validated request: the job to queue and the decoder of its reply body."""

    kind: TaskKind
    head: str
    texts: tuple[str, ...]
    decode: Callable[[bytes], Message]
    top_k: int = 1
    params: dict[str, Any] = field(default_factory=dict)


Planner = Callable[[Any, GatewaySettings, Manifest | None], Plan]


def plan_embed(
    request: pb.EmbedRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """Embed: the built-in embedding head, which every worker serves."""
    task = TASKS[TaskKind.EMBED]
    texts = check_texts(request.texts, settings)
    if catalog is not None:
        _head(task, "", catalog)
    return _plan(task, task.default_head, texts)


def plan_classify(
    request: pb.ClassifyRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """Classify: one classification head."""
    task = TASKS[TaskKind.CLASSIFY]
    texts = check_texts(request.texts, settings)
    head = _head(task, request.head, catalog)
    return _plan(task, head.name, texts, check_top_k(request.top_k, head))


def plan_entities(
    request: pb.ExtractEntitiesRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """ExtractEntities: one token-classification head ("entities" by default)."""
    task = TASKS[TaskKind.ENTITIES]
    texts = check_texts(request.texts, settings)
    head = _head(task, request.head, catalog)
    return _plan(task, head.name, texts)


def plan_similarity(
    request: pb.SimilarityRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """Similarity: the query and candidates go through one encoder pass."""
    task = TASKS[TaskKind.SIMILARITY]
    texts = check_candidates(request.query, request.candidates, settings)
    if request.top_k < 0:
        raise InvalidArgument(f"top_k is {request.top_k}; it must be 0 (no ranking) or more")
    head = _head(task, "", catalog)
    return _plan(task, head.name, texts, min(request.top_k, len(texts) - 1))


def plan_zero_shot(
    request: pb.ZeroShotClassifyRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """ZeroShotClassify: texts plus the caller's labels (label sentences are cached)."""
    task = TASKS[TaskKind.ZERO_SHOT]
    texts = check_texts(request.texts, settings)
    labels = check_labels(request.labels, request.hypothesis_template, settings)
    head = _head(task, "", catalog)
    params = {"labels": labels, "template": request.hypothesis_template}
    return _plan(task, head.name, texts, len(labels), params)


def plan_anonymize(
    request: pb.AnonymizeRequest, settings: GatewaySettings, catalog: Manifest | None
) -> Plan:
    """Anonymize: the entities of one token-classification head, replaced."""
    task = TASKS[TaskKind.ANONYMIZE]
    texts = check_texts(request.texts, settings)
    style = check_style(request.style)
    head = _head(task, request.head, catalog)
    params = {"labels": check_entity_labels(request.labels, head), "style": style.value}
    return _plan(task, head.name, texts, params=params)


def analyze_params(request: pb.AnalyzeRequest, heads: list[HeadSpec]) -> dict[str, Any]:
    """The params of Analyze's jobs: its heads and, with the anonymize option, what each
    token-classification head replaces and how (as `plan_anonymize` checks them)."""
    params: dict[str, Any] = {"heads": [h.name for h in heads]}
    task = TASKS[TaskKind.ANONYMIZE]
    if not request.HasField(task.analyze_option):  # type: ignore[arg-type]
        return params
    options: pb.AnonymizeOptions = getattr(request, task.analyze_option)
    style = check_style(options.style)
    (kind,) = head_kinds_of(task.kind)
    labels = {h.name: check_entity_labels(options.labels, h) for h in heads if h.kind == kind}
    if not labels:
        raise InvalidArgument(
            f"{task.analyze_option} is set but heads names no {kind} head: add one "
            f"(e.g. {task.default_head!r}) or leave {task.analyze_option} unset"
        )
    params[task.analyze_option] = {"labels": labels, "style": style.value}
    return params


# Most distinct texts in one of Analyze's jobs. A job is what streams back at once, and
# each costs a queue entry, a reply, metrics and spans on both sides, on the cores the
# encoder needs: a job per text made 32 of each for a request of 32 texts. The texts of
# one request mostly share a batch anyway, so they are done together.
ANALYZE_TEXTS_PER_JOB = 8


def analyze_jobs(distinct: list[str], params: dict[str, Any]) -> list[tuple[str, ...]]:
    """The texts of each of Analyze's jobs: up to ANALYZE_TEXTS_PER_JOB distinct texts each,
    whose results stream back as soon as that job is done; but one job for all when
    pseudonyms are numbered across the texts, which one worker must then see in order."""
    options = params.get(TASKS[TaskKind.ANONYMIZE].analyze_option, {})
    if options.get("style") == Style.PSEUDONYM:
        return [tuple(distinct)]
    step = ANALYZE_TEXTS_PER_JOB
    return [tuple(distinct[i : i + step]) for i in range(0, len(distinct), step)]


# One planner per task kind but Analyze, which the servicer plans: it streams its results.
PLANNERS: dict[TaskKind, Planner] = {
    TaskKind.EMBED: plan_embed,
    TaskKind.CLASSIFY: plan_classify,
    TaskKind.ENTITIES: plan_entities,
    TaskKind.SIMILARITY: plan_similarity,
    TaskKind.ZERO_SHOT: plan_zero_shot,
    TaskKind.ANONYMIZE: plan_anonymize,
}


def _head(task: TaskSpec, name: str, catalog: Manifest | None) -> HeadSpec:
    """The named head (the task's default head when empty), served and of the task's kind."""
    (kind,) = head_kinds_of(task.kind)
    return check_head(name or task.default_head, kind, catalog, task.rpc)


def _plan(
    task: TaskSpec,
    head: str,
    texts: tuple[str, ...],
    top_k: int = 1,
    params: dict[str, Any] | None = None,
) -> Plan:
    return Plan(task.kind, head, texts, task.response.FromString, top_k, params or {})
