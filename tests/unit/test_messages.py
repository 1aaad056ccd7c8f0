"""The Redis message schema: round trips and refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest

from router import keys
from router.messages import (
    Job,
    MalformedMessage,
    Reply,
    pack_messages,
    reply_address,
    stream_entries,
    unpack_messages,
)


def _fields(d: dict[str, str | int | bytes]) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in d.items()}


JOB = Job(
    id="abc",
    reply_to=keys.reply_stream("gw1"),
    deadline_ms=1_700_000_000_000,
    kind="classify",
    head="sentiment",
    texts=("héllo", "東京 🙂", 'quote " and \\ backslash'),
    top_k=2,
    enqueued_ms=1_699_999_999_000,
)


def test_job_round_trip() -> None:
    assert Job.decode(_fields(JOB.encode())) == JOB


def test_reply_round_trip_keeps_binary_body() -> None:
    reply = Reply(id="abc", code=0, body=bytes(range(256)))
    assert Reply.decode(_fields(reply.encode())) == reply


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"v": "2"}, "schema version"),
        ({"texts": "not json"}, "not JSON"),
        ({"texts": json.dumps([1, 2])}, "array of strings"),
        ({"texts": "[]"}, "texts"),
        ({"deadline_ms": "soon"}, "not an integer"),
        ({"kind": "dance"}, "unknown job kind"),
        ({"top_k": "-1"}, "top_k"),
        ({"params": "[1]"}, "JSON object"),
        ({"id": b"\xff\xfe"}, "not UTF-8"),
    ],
)
def test_malformed_jobs_are_refused(change: dict[str, str | bytes], problem: str) -> None:
    fields = _fields({**JOB.encode(), **change})
    with pytest.raises(MalformedMessage, match=problem):
        Job.decode(fields)


def test_missing_field_is_named() -> None:
    fields = _fields(JOB.encode())
    del fields[b"reply_to"]
    with pytest.raises(MalformedMessage, match="reply_to"):
        Job.decode(fields)
    assert reply_address(fields) is None
    assert reply_address(_fields(JOB.encode())) == ("abc", JOB.reply_to)


def test_stream_entries_skips_deleted_entries() -> None:
    response = [[b"s", [(b"1-0", {b"a": b"1"}), (b"2-0", None)]]]
    assert stream_entries(response) == [(b"s", [(b"1-0", {b"a": b"1"})])]
    assert stream_entries(None) == []


def test_keys_round_trip() -> None:
    assert keys.head_of_stream(keys.task_stream("intent")) == "intent"
    assert keys.reply_stream("g").startswith(keys.PREFIX)


def test_packed_messages_round_trip() -> None:
    messages = [b"", b"a", bytes(200), bytes(range(256)) * 100]
    assert unpack_messages(pack_messages(messages)) == messages
    with pytest.raises(MalformedMessage):
        unpack_messages(pack_messages([b"abc"])[:-1])


def test_job_params_round_trip() -> None:
    job = Job(
        id="z",
        reply_to=keys.reply_stream("g"),
        deadline_ms=1,
        kind="zero_shot",
        head="zero-shot",
        texts=("t",),
        params={"labels": ["a", "é"], "template": "about {}"},
    )
    assert Job.decode(_fields(job.encode())) == job


def test_replies_only_go_to_reply_streams() -> None:
    fields = _fields({**JOB.encode(), "reply_to": keys.task_stream("embed")})
    with pytest.raises(MalformedMessage, match="not a reply stream"):
        Job.decode(fields)
    assert reply_address(fields) is None


def test_job_traceparent_round_trip_and_absent_means_none() -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    job = dataclasses.replace(JOB, traceparent=traceparent)
    assert job.encode()["traceparent"] == traceparent
    assert Job.decode(_fields(job.encode())) == job
    assert "traceparent" not in JOB.encode()  # entries without tracing stay as they were
    fields = _fields(JOB.encode())
    assert Job.decode(fields).traceparent == ""  # an entry from an older gateway
