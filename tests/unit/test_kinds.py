"""The table of task kinds against the proto, and every layer against the table."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor
from taskmux_api.kinds import (
    ANALYZABLE,
    HEAD_KINDS,
    PIPELINE_TASKS,
    TASKS,
    TRAINED,
    HeadKind,
    TaskKind,
    TaskSpec,
    head_kind_proto,
    head_kinds_of,
    task_of_request,
    task_of_rpc,
)
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client._requests import pipeline_request

from gateway.auth import request_heads
from gateway.plans import PLANNERS
from gateway.service import TaskMuxService
from model.heads import HEAD_TYPES
from workers.tasks import BUILDERS

SERVICE = pb.DESCRIPTOR.services_by_name["TaskMux"]
NOT_TASKS = {"ListTasks", "Pipeline"}  # the catalog, and the stream that carries tasks
ROWS = list(TASKS.values())


def test_task_and_head_kind_values_are_the_stored_strings() -> None:
    # Job kinds are written into Redis and head kinds into manifest.json: never rename.
    assert [k.value for k in TaskKind] == [
        "embed",
        "classify",
        "entities",
        "similarity",
        "zero_shot",
        "analyze",
        "anonymize",
    ]
    assert [k.value for k in HeadKind] == [
        "embedding",
        "classification",
        "token_classification",
        "similarity",
        "zero_shot",
    ]


def test_every_task_rpc_has_one_row_with_its_messages() -> None:
    rpcs = {m.name: m for m in SERVICE.methods if m.name not in NOT_TASKS}
    assert sorted(rpcs) == sorted(row.rpc for row in ROWS)
    for row in ROWS:
        method = rpcs[row.rpc]
        assert method.input_type is row.request.DESCRIPTOR, row.rpc
        assert method.output_type is row.response.DESCRIPTOR, row.rpc
        assert set(TASKS) == set(TaskKind) and TASKS[row.kind] is row


def test_every_pipeline_field_maps_to_a_row() -> None:
    tasks = pb.PipelineRequest.DESCRIPTOR.oneofs_by_name["task"].fields
    results = pb.PipelineResponse.DESCRIPTOR.oneofs_by_name["result"].fields
    assert {f.name for f in tasks} == set(PIPELINE_TASKS)
    assert {f.name for f in results} == set(PIPELINE_TASKS) | {"error"}
    for f in tasks:
        assert f.message_type is PIPELINE_TASKS[f.name].request.DESCRIPTOR, f.name
    for f in results:
        if f.name != "error":
            assert f.message_type is PIPELINE_TASKS[f.name].response.DESCRIPTOR, f.name


def test_every_head_kind_enum_is_covered_once() -> None:
    protos = [v.number for v in pb.HeadKind.DESCRIPTOR.values if v.number]
    assert sorted(spec.proto for spec in HEAD_KINDS.values()) == sorted(protos)
    assert set(HEAD_KINDS) == set(HeadKind)
    for kind, spec in HEAD_KINDS.items():
        assert spec.kind is kind and head_kind_proto(kind.value) == spec.proto
    assert head_kind_proto("telepathy") == pb.HEAD_KIND_UNSPECIFIED


def test_analyze_fields_are_the_analyzable_head_kinds_and_options() -> None:
    fields = pb.AnalyzeResult.DESCRIPTOR.oneofs_by_name["result"].fields
    by_field = {spec.analyze_field: spec.kind for spec in HEAD_KINDS.values() if spec.analyze_field}
    options = [row for row in ROWS if row.analyze_option]
    assert set(by_field) | {row.analyze_field for row in options} == {f.name for f in fields}
    for row in options:  # an option runs a task on heads Analyze takes, with its own result
        assert row.head is not None and row.head.kind in ANALYZABLE, row.rpc
        assert row.analyze_field and row.analyze_field not in by_field, row.rpc
        option = pb.AnalyzeRequest.DESCRIPTOR.fields_by_name[row.analyze_option]
        assert option.message_type is not None and option.has_presence, row.rpc
    assert ANALYZABLE == (
        HeadKind.EMBEDDING,
        HeadKind.CLASSIFICATION,
        HeadKind.TOKEN_CLASSIFICATION,
    )
    assert head_kinds_of("analyze") == ANALYZABLE
    assert TRAINED == (HeadKind.CLASSIFICATION, HeadKind.TOKEN_CLASSIFICATION)


@pytest.mark.parametrize("row", ROWS, ids=[row.kind.value for row in ROWS])
def test_head_field_is_a_string_field_of_the_request(row: TaskSpec) -> None:
    if not row.head_field:
        assert row.default_head, f"{row.rpc} names no head and has no default one"
        return
    field = row.request.DESCRIPTOR.fields_by_name[row.head_field]
    assert field.type == FieldDescriptor.TYPE_STRING
    # Only a task that runs on several head kinds names several heads.
    assert (row.head is None) == field.is_repeated


def test_every_task_has_its_planner_builder_and_rpc() -> None:
    # Analyze streams its results: the servicer plans it itself.
    assert set(PLANNERS) == set(TaskKind) - {TaskKind.ANALYZE}
    assert set(BUILDERS) == set(TaskKind)
    assert set(HEAD_TYPES) == set(HeadKind)
    for row in ROWS:
        assert task_of_rpc(row.rpc) is row
        if row.kind not in PLANNERS:  # served by a method of its own
            handler = getattr(TaskMuxService, row.rpc)
            assert handler is not getattr(taskmux_pb2_grpc.TaskMuxServicer, row.rpc), row.rpc


@pytest.mark.parametrize("row", ROWS, ids=[row.kind.value for row in ROWS])
def test_auth_finds_the_heads_of_every_task(row: TaskSpec) -> None:
    request = row.request()
    assert task_of_request(request) is row
    if row.head_field and row.head is None:
        getattr(request, row.head_field).extend(["a", "b"])
        assert request_heads(request) == ["a", "b"]
        return
    assert request_heads(request) == [row.default_head]
    if row.head_field:
        setattr(request, row.head_field, "mine")
        assert request_heads(request) == ["mine"]
    if row.pipeline_field:
        assert request_heads(pipeline_request(request, 0)) == request_heads(request)


@pytest.mark.parametrize("field", sorted(PIPELINE_TASKS))
def test_client_wraps_every_pipeline_task(field: str) -> None:
    request = pipeline_request(PIPELINE_TASKS[field].request(), 3)
    assert request.id == "3" and request.WhichOneof("task") == field


def test_client_refuses_what_is_not_a_pipeline_task() -> None:
    with pytest.raises(TypeError, match="not a pipeline task: AnalyzeRequest"):
        pipeline_request(pb.AnalyzeRequest(), 0)  # type: ignore[arg-type]
    assert task_of_request(pb.ListTasksRequest()) is None
    assert request_heads(pb.ListTasksRequest()) == []
