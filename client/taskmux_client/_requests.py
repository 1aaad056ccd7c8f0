"""Building the API requests: metadata ids, and Pipeline tasks from plain task messages."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TypeVar

from taskmux_api.kinds import task_of_request
from taskmux_api.v1 import taskmux_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0

TaskRequest = (
    pb.EmbedRequest
    | pb.ClassifyRequest
    | pb.ExtractEntitiesRequest
    | pb.SimilarityRequest
    | pb.ZeroShotClassifyRequest
    | pb.AnonymizeRequest
)
# What `pipeline` accepts: a full PipelineRequest, or a task message (its id is then
# its position in the stream, "0", "1", ...).
Task = pb.PipelineRequest | TaskRequest

R = TypeVar(
    "R",
    pb.EmbedRequest,
    pb.ClassifyRequest,
    pb.ExtractEntitiesRequest,
    pb.SimilarityRequest,
    pb.ZeroShotClassifyRequest,
    pb.AnalyzeRequest,
    pb.AnonymizeRequest,
)


def with_ids(
    request: R, request_id: str | None, idempotency_key: str | None, *, auto_key: bool
) -> R:
    """The request with its request_id and idempotency_key set, generated where missing.

    The ids are fixed here, once per logical call, so every retry sends the same ones.
    """
    request.request_id = request_id or request.request_id or uuid.uuid4().hex
    if idempotency_key is not None:
        request.idempotency_key = idempotency_key
    elif not request.idempotency_key and auto_key:
        request.idempotency_key = uuid.uuid4().hex
    return request


def pipeline_request(task: Task, index: int) -> pb.PipelineRequest:
    """A PipelineRequest for `task`; a plain task message gets the id str(index)."""
    if isinstance(task, pb.PipelineRequest):
        return task
    spec = task_of_request(task)
    if spec is None or not spec.pipeline_field:
        raise TypeError(f"not a pipeline task: {type(task).__name__}")
    request = pb.PipelineRequest(id=str(index))
    getattr(request, spec.pipeline_field).CopyFrom(task)
    return request


def texts_list(texts: Sequence[str] | str, name: str = "texts") -> list[str]:
    """The texts as a list; a lone string is refused (it would be split into characters)."""
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not one string: use [text]")
    return list(texts)
