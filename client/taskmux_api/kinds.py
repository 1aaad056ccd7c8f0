"""The table of task kinds: one row per task the TaskMux API offers.

Two words, used the same way everywhere:

- a **task kind** (`TaskKind`) is what a client asks for and a job computes, one per task
  RPC. Its value is the `kind` of a job in Redis (router/messages.py) and part of the
  idempotency keys (router/keys.py), so a value, once released, never changes.
- a **head kind** (`HeadKind`) is what a head of the model repository is. Its value is the
  `kind` of a head in manifest.json and in the catalog that workers publish; ListTasks
  reports it as the proto enum `HeadKind`.

A task runs on heads of one head kind; Analyze runs on several, those with an
`AnalyzeResult` field. A task with an `analyze_option` (Anonymize) also runs inside
Analyze: when that `AnalyzeRequest` field is set, its head kind's heads answer with the
task's `analyze_field` instead of their own. Each layer looks itself up here rather than
keeping its own list: the gateway's planners (gateway/plans.py) and auth (the heads a
request names), the worker's builders (workers/tasks.py), the manifest and head classes
(model/), and the client (Pipeline fields). tests/unit/test_kinds.py checks this table against
the proto and that every row has its planner, builder and head class. To add a task, see
the README's "Adding a task".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from google.protobuf.message import Message

from taskmux_api.v1 import taskmux_pb2 as pb


class TaskKind(StrEnum):
    """What a job computes (the `kind` field of a job in Redis)."""

    EMBED = "embed"
    CLASSIFY = "classify"
    ENTITIES = "entities"
    SIMILARITY = "similarity"
    ZERO_SHOT = "zero_shot"
    ANALYZE = "analyze"
    ANONYMIZE = "anonymize"


class HeadKind(StrEnum):
    """What a head is (the `kind` of a head in manifest.json)."""

    EMBEDDING = "embedding"  # the sentence vector itself
    CLASSIFICATION = "classification"  # one label per text (weights on the sentence vector)
    TOKEN_CLASSIFICATION = "token_classification"  # nosec B105: entity spans, per token
    SIMILARITY = "similarity"  # cosine of query and candidates; no weights
    ZERO_SHOT = "zero_shot"  # caller-named labels, compared by embedding; no weights


@dataclass(frozen=True)
class HeadKindSpec:
    """One head kind: how the API names it and what the manifest and Analyze expect."""

    kind: HeadKind
    proto: pb.HeadKind.ValueType  # as ListTasks reports it
    trained: bool  # its heads carry 2+ labels and a weights file
    analyze_field: str = ""  # its AnalyzeResult oneof field; "": Analyze cannot run it


@dataclass(frozen=True)
class TaskSpec:
    """One task kind: its RPC, the heads it runs on and its place in a Pipeline."""

    kind: TaskKind
    rpc: str  # the TaskMux RPC
    request: type[Message]
    response: type[Message]  # a reply body (Analyze: each message packed in it)
    head: HeadKindSpec | None  # the kind of head it runs on; None: several (Analyze)
    head_field: str = ""  # the request field that names its head(s); "": none
    default_head: str = ""  # the head used when head_field is absent or empty
    pipeline_field: str = ""  # its PipelineRequest/Response oneof field; "": not in Pipeline
    analyze_option: str = ""  # the AnalyzeRequest field that runs it in Analyze; "": none
    analyze_field: str = ""  # its AnalyzeResult oneof field then, in place of its head kind's


EMBEDDING: Final = HeadKindSpec(
    HeadKind.EMBEDDING, pb.HEAD_KIND_EMBEDDING, trained=False, analyze_field="embedding"
)
CLASSIFICATION: Final = HeadKindSpec(
    HeadKind.CLASSIFICATION,
    pb.HEAD_KIND_CLASSIFICATION,
    trained=True,
    analyze_field="classification",
)
TOKEN_CLASSIFICATION: Final = HeadKindSpec(
    HeadKind.TOKEN_CLASSIFICATION,
    pb.HEAD_KIND_TOKEN_CLASSIFICATION,
    trained=True,
    analyze_field="entities",
)
SIMILARITY: Final = HeadKindSpec(HeadKind.SIMILARITY, pb.HEAD_KIND_SIMILARITY, trained=False)
ZERO_SHOT: Final = HeadKindSpec(HeadKind.ZERO_SHOT, pb.HEAD_KIND_ZERO_SHOT, trained=False)

_ROWS: Final = (
    TaskSpec(
        TaskKind.EMBED,
        "Embed",
        pb.EmbedRequest,
        pb.EmbedResponse,
        EMBEDDING,
        default_head="embed",
        pipeline_field="embed",
    ),
    TaskSpec(
        TaskKind.CLASSIFY,
        "Classify",
        pb.ClassifyRequest,
        pb.ClassifyResponse,
        CLASSIFICATION,
        head_field="head",
        pipeline_field="classify",
    ),
    TaskSpec(
        TaskKind.ENTITIES,
        "ExtractEntities",
        pb.ExtractEntitiesRequest,
        pb.ExtractEntitiesResponse,
        TOKEN_CLASSIFICATION,
        head_field="head",
        default_head="entities",
        pipeline_field="extract_entities",
    ),
    TaskSpec(
        TaskKind.SIMILARITY,
        "Similarity",
        pb.SimilarityRequest,
        pb.SimilarityResponse,
        SIMILARITY,
        default_head="similarity",
        pipeline_field="similarity",
    ),
    TaskSpec(
        TaskKind.ZERO_SHOT,
        "ZeroShotClassify",
        pb.ZeroShotClassifyRequest,
        pb.ZeroShotClassifyResponse,
        ZERO_SHOT,
        default_head="zero-shot",
        pipeline_field="zero_shot_classify",
    ),
    TaskSpec(
        TaskKind.ANALYZE, "Analyze", pb.AnalyzeRequest, pb.AnalyzeResult, None, head_field="heads"
    ),
    TaskSpec(
        TaskKind.ANONYMIZE,
        "Anonymize",
        pb.AnonymizeRequest,
        pb.AnonymizeResponse,
        TOKEN_CLASSIFICATION,
        head_field="head",
        default_head="entities",
        pipeline_field="anonymize",
        analyze_option="anonymize",
        analyze_field="anonymized",
    ),
)

TASKS: Final[dict[TaskKind, TaskSpec]] = {row.kind: row for row in _ROWS}
HEAD_KINDS: Final[dict[HeadKind, HeadKindSpec]] = {
    row.head.kind: row.head for row in _ROWS if row.head is not None
}
PIPELINE_TASKS: Final[dict[str, TaskSpec]] = {
    row.pipeline_field: row for row in _ROWS if row.pipeline_field
}
ANALYZABLE: Final = tuple(h.kind for h in HEAD_KINDS.values() if h.analyze_field)
TRAINED: Final = tuple(h.kind for h in HEAD_KINDS.values() if h.trained)
_BY_REQUEST: Final[dict[type, TaskSpec]] = {row.request: row for row in _ROWS}
_BY_RPC: Final[dict[str, TaskSpec]] = {row.rpc: row for row in _ROWS}


def task_spec(kind: str) -> TaskSpec:
    """The row of a task kind; ValueError for a kind this build does not know."""
    return TASKS[TaskKind(kind)]


def task_of_request(request: object) -> TaskSpec | None:
    """The row whose RPC takes `request`; None for other messages (ListTasks, Pipeline)."""
    return _BY_REQUEST.get(type(request))


def task_of_rpc(rpc: str) -> TaskSpec | None:
    """The row served by the RPC named `rpc`; None for ListTasks and Pipeline."""
    return _BY_RPC.get(rpc)


def head_kinds_of(kind: str) -> tuple[HeadKind, ...]:
    """The head kinds a job of task kind `kind` may run on."""
    head = task_spec(kind).head
    return ANALYZABLE if head is None else (head.kind,)


def head_kind_proto(kind: str) -> pb.HeadKind.ValueType:
    """The API's enum for a head kind; HEAD_KIND_UNSPECIFIED for one it does not know."""
    try:
        return HEAD_KINDS[HeadKind(kind)].proto
    except ValueError:
        return pb.HEAD_KIND_UNSPECIFIED
