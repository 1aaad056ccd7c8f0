"""Fuzzing through a real gateway and worker: bad input gets a documented status, never
INTERNAL or UNKNOWN, and neither process dies. Also undecodable wire bytes, and garbage
written straight into the job streams, which must end in the dead-letter stream."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from model.manifest import load_manifest
from router import keys
from router.messages import Job, MalformedMessage
from tests.clusters import ClusterFactory
from tests.harness import Cluster, Proc

pytestmark = pytest.mark.integration

Code = grpc.StatusCode
DOCUMENTED = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED,
    Code.UNAVAILABLE,
}
MAX_TEXTS = 6
MAX_CHARS = 200
MAX_MESSAGE_BYTES = 32 * 1024
CALL_TIMEOUT_S = 20
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SERVICE = "/taskmux.v1.TaskMux/"


@dataclass
class Target:
    """The cluster under test and a channel to its gateway, with outcome counts."""

    cluster: Cluster
    channel: grpc.Channel
    stub: taskmux_pb2_grpc.TaskMuxStub
    heads: list[str]
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)

    def procs(self) -> list[Proc]:
        return [p for p in self.cluster.procs if p.name in ("gateway", "worker")]

    def check(self, rpc: str, call: Callable[[], Any]) -> Any:
        """Run one call; fail unless it ends OK or with a documented status."""
        try:
            response = call()
        except grpc.RpcError as err:
            code = err.code()
            self.count(rpc, code.name)
            assert code in DOCUMENTED, f"{code.name}: {err.details()}"
            assert "internal error" not in (err.details() or "")
            return None
        self.count(rpc, "OK")
        return response

    def count(self, rpc: str, outcome: str) -> None:
        counts = self.outcomes.setdefault(rpc, {})
        counts[outcome] = counts.get(outcome, 0) + 1


@pytest.fixture(scope="module")
def target(make_shared_cluster: ClusterFactory, model_repo: Path) -> Iterator[Target]:
    gateway = {
        "max_texts_per_request": str(MAX_TEXTS),
        "max_text_chars": str(MAX_CHARS),
        "max_candidates": str(MAX_TEXTS),
        "max_labels": str(MAX_TEXTS),
        "max_heads_per_request": "5",
        "max_message_bytes": str(MAX_MESSAGE_BYTES),
    }
    c = make_shared_cluster(gateways=[gateway], ready="catalog")
    heads = [h.name for h in load_manifest(model_repo, verify=False).heads]
    with grpc.insecure_channel(c.gateways[0].address) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        t = Target(c, channel, stub, heads)
        yield t
        print("\nfuzz outcomes:")
        for rpc, counts in sorted(t.outcomes.items()):
            print(f"  {rpc}: {sum(counts.values())} calls, {dict(sorted(counts.items()))}")
        for proc in t.procs():
            assert proc.popen.poll() is None, f"{proc.name} died:\n{proc.output()[-3000:]}"
        assert "internal error" not in c.logs()


# --- strategies ---------------------------------------------------------------------------

# Any code point but surrogates (which no UTF-8 string can hold): control characters,
# NUL, combining marks, private use, unassigned, emoji.
any_char = st.characters(exclude_categories=("Cs",))
# Mostly texts the gateway accepts, so the worker sees odd Unicode too; then the edges.
valid_text = st.text(any_char, min_size=1, max_size=60).filter(str.strip)
edge_text = st.one_of(
    st.text(any_char, min_size=MAX_CHARS - 2, max_size=MAX_CHARS + 2),
    st.sampled_from(["", " ", "\x00", "\t\n\r", "\u200b", "\ufeff", "🙂" * MAX_CHARS, "a"]),
)
text = st.one_of(valid_text, valid_text, valid_text, edge_text)
texts = st.one_of(
    st.lists(valid_text, min_size=1, max_size=MAX_TEXTS),
    st.lists(text, max_size=MAX_TEXTS + 2),
)
served = ["sentiment", "intent", "topic", "entities", "embed", "similarity", "zero-shot"]
head_name = st.one_of(
    st.sampled_from(served),
    st.sampled_from(served),
    st.just("_analyze"),
    st.text(any_char, max_size=30),
)
top_k = st.one_of(st.integers(-3, 5), st.sampled_from([-(2**31), 2**31 - 1, 1000]))
printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
meta = st.one_of(
    st.just(""),
    st.just(""),
    st.uuids().map(str),
    st.uuids().map(str),
    st.text(printable, min_size=1, max_size=128),
    st.text(any_char, max_size=140),  # mostly not printable ASCII: INVALID_ARGUMENT
)


def with_meta(message: Any, request_id: str, key: str) -> Any:
    message.request_id = request_id
    message.idempotency_key = key
    return message


# --- unary RPCs and Analyze ---------------------------------------------------------------


@FUZZ
@given(texts=texts, request_id=meta, key=meta)
def test_fuzz_embed(target: Target, texts: list[str], request_id: str, key: str) -> None:
    request = with_meta(pb.EmbedRequest(texts=texts), request_id, key)
    response = target.check("Embed", lambda: target.stub.Embed(request, timeout=CALL_TIMEOUT_S))
    if response is not None:
        assert len(response.embeddings) == len(texts)


@FUZZ
@given(
    head=st.one_of(st.sampled_from(["sentiment", "intent", "topic"]), head_name),
    texts=texts,
    top_k=top_k,
    request_id=meta,
)
def test_fuzz_classify(
    target: Target, head: str, texts: list[str], top_k: int, request_id: str
) -> None:
    request = pb.ClassifyRequest(head=head, texts=texts, top_k=top_k, request_id=request_id)
    response = target.check(
        "Classify", lambda: target.stub.Classify(request, timeout=CALL_TIMEOUT_S)
    )
    if response is not None:
        assert len(response.results) == len(texts)
        assert all(1 <= len(r.top) <= max(top_k, 1) for r in response.results)


@FUZZ
@given(head=st.one_of(st.just(""), st.just("entities"), head_name), texts=texts, key=meta)
def test_fuzz_extract_entities(target: Target, head: str, texts: list[str], key: str) -> None:
    request = pb.ExtractEntitiesRequest(head=head, texts=texts, idempotency_key=key)
    response = target.check(
        "ExtractEntities", lambda: target.stub.ExtractEntities(request, timeout=CALL_TIMEOUT_S)
    )
    if response is not None:
        assert len(response.results) == len(texts)
        for t, result in zip(texts, response.results, strict=True):
            assert all(t[e.start : e.end] == e.text for e in result.entities)


@FUZZ
@given(
    head=st.one_of(st.just(""), st.just("entities"), head_name),
    texts=texts,
    labels=st.lists(
        st.one_of(st.sampled_from(["PER", "ORG", "LOC", "MISC"]), st.text(any_char, max_size=8)),
        max_size=5,
    ),
    style=st.one_of(st.integers(0, 3), st.sampled_from([-1, 2**31 - 1])),
)
def test_fuzz_anonymize(
    target: Target, head: str, texts: list[str], labels: list[str], style: int
) -> None:
    request = pb.AnonymizeRequest(head=head, texts=texts, labels=labels, style=style)  # type: ignore[arg-type]
    response = target.check(
        "Anonymize", lambda: target.stub.Anonymize(request, timeout=CALL_TIMEOUT_S)
    )
    if response is not None:
        assert len(response.results) == len(texts)
        for t, result in zip(texts, response.results, strict=True):
            for s in result.spans:
                label = re.escape(s.label)
                replacement = result.text[s.output_start : s.output_end]
                assert re.fullmatch(rf"\[{label}\]|{label}_[1-9][0-9]*", replacement)
                assert 0 <= s.start < s.end <= len(t)


@FUZZ
@given(query=text, candidates=texts, top_k=top_k)
def test_fuzz_similarity(target: Target, query: str, candidates: list[str], top_k: int) -> None:
    request = pb.SimilarityRequest(query=query, candidates=candidates, top_k=top_k)
    response = target.check(
        "Similarity", lambda: target.stub.Similarity(request, timeout=CALL_TIMEOUT_S)
    )
    if response is not None:
        assert len(response.scores) == len(candidates)
        assert len(response.top) == min(max(top_k, 0), len(candidates))


@FUZZ
@given(
    texts=texts,
    labels=st.one_of(
        st.lists(valid_text, min_size=2, max_size=MAX_TEXTS, unique=True),
        st.lists(text, max_size=MAX_TEXTS + 2),
    ),
    template=st.one_of(
        st.just(""),
        st.text(any_char, max_size=30).map(lambda s: s + "{}"),
        st.text(any_char, max_size=30),
        st.just("about {} and {}"),
    ),
)
def test_fuzz_zero_shot(target: Target, texts: list[str], labels: list[str], template: str) -> None:
    request = pb.ZeroShotClassifyRequest(texts=texts, labels=labels, hypothesis_template=template)
    response = target.check(
        "ZeroShotClassify", lambda: target.stub.ZeroShotClassify(request, timeout=CALL_TIMEOUT_S)
    )
    if response is not None:
        assert len(response.results) == len(texts)
        assert all(len(r.top) == len(labels) for r in response.results)


@FUZZ
@given(
    texts=texts,
    heads=st.one_of(
        st.lists(
            st.sampled_from(["embed", "sentiment", "intent", "topic", "entities"]),
            min_size=1,
            max_size=4,
            unique=True,
        ),
        st.lists(head_name, max_size=5),
    ),
    top_k=top_k,
    key=meta,
)
def test_fuzz_analyze(
    target: Target, texts: list[str], heads: list[str], top_k: int, key: str
) -> None:
    request = pb.AnalyzeRequest(texts=texts, heads=heads, top_k=top_k, idempotency_key=key)
    results = target.check(
        "Analyze", lambda: list(target.stub.Analyze(request, timeout=CALL_TIMEOUT_S))
    )
    if results is not None:
        assert len(results) == len(texts) * len(heads)


@FUZZ
@given(texts=st.lists(valid_text, min_size=1, max_size=MAX_TEXTS), top_k=st.integers(0, 200))
def test_fuzz_any_valid_text_is_computed_by_every_head(
    target: Target, texts: list[str], top_k: int
) -> None:
    heads = ["embed", "sentiment", "intent", "topic", "entities"]
    request = pb.AnalyzeRequest(texts=texts, heads=heads, top_k=top_k)
    results = list(target.stub.Analyze(request, timeout=CALL_TIMEOUT_S))  # OK, or the test fails
    target.count("Analyze (valid shape)", "OK")
    assert sorted((r.text_index, r.head) for r in results) == sorted(
        (i, h) for i in range(len(texts)) for h in heads
    )
    for result in results:
        if result.head == "entities":
            t = texts[result.text_index]
            assert all(t[e.start : e.end] == e.text for e in result.entities.entities)


@settings(FUZZ, max_examples=8)
@given(size=st.integers(MAX_MESSAGE_BYTES + 1, 4 * MAX_MESSAGE_BYTES))
def test_fuzz_oversized_messages(target: Target, size: int) -> None:
    request = pb.EmbedRequest(texts=["x" * size])
    with pytest.raises(grpc.RpcError) as info:
        target.stub.Embed(request, timeout=CALL_TIMEOUT_S)
    assert info.value.code() == Code.RESOURCE_EXHAUSTED


# --- bytes that are not the message they claim to be --------------------------------------


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(number: int, raw: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(raw)) + raw


NOT_UTF8 = b"\xff\xfe caf\xe9 \xc3\x28 \xed\xa0\x80"  # bad lead bytes, Latin-1, a surrogate
UNDECODABLE = [
    ("Embed", _string(1, NOT_UTF8)),
    ("Embed", _string(1, b"fine") + _string(100, NOT_UTF8)),  # request_id
    ("Embed", _string(101, NOT_UTF8)),  # idempotency_key
    ("Classify", _string(1, NOT_UTF8) + _string(2, b"text")),
    ("ExtractEntities", _string(2, NOT_UTF8)),
    ("Similarity", _string(1, NOT_UTF8) + _string(2, b"candidate")),
    ("ZeroShotClassify", _string(1, b"t") + _string(2, NOT_UTF8) + _string(2, b"b")),
    ("Anonymize", _string(1, b"t") + _string(2, NOT_UTF8)),  # labels[0]
    ("Embed", b"\x0a\x05ab"),  # a length past the end
    ("Classify", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),  # an over-long varint tag
    ("ListTasks", b"\x0a\x05ab"),
]


@pytest.mark.parametrize(("method", "payload"), UNDECODABLE)
def test_undecodable_bytes_are_invalid_argument(
    target: Target, method: str, payload: bytes
) -> None:
    call = target.channel.unary_unary(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "not a valid taskmux.v1." in info.value.details()


def test_undecodable_bytes_in_streams(target: Target) -> None:
    analyze = target.channel.unary_stream(
        SERVICE + "Analyze", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as info:
        list(analyze(_string(1, b"t") + _string(2, NOT_UTF8), timeout=10))
    assert info.value.code() == Code.INVALID_ARGUMENT
    pipeline = target.channel.stream_stream(
        SERVICE + "Pipeline", request_serializer=None, response_deserializer=None
    )
    good = pb.PipelineRequest(id="good", embed=pb.EmbedRequest(texts=["ok"]))
    bad = _string(1, b"bad") + _string(2, _string(1, NOT_UTF8))  # embed.texts[0]
    answers = [
        pb.PipelineResponse.FromString(raw)
        for raw in pipeline(iter([bad, good.SerializeToString()]), timeout=30)
    ]
    by_id = {a.id: a for a in answers}
    assert set(by_id) == {"", "good"}  # the undecodable task's id is unknown
    assert by_id[""].error.code == Code.INVALID_ARGUMENT.value[0]
    assert by_id["good"].WhichOneof("result") == "embed"


@settings(FUZZ, max_examples=30)
@given(
    method=st.sampled_from(
        ["Embed", "Classify", "ExtractEntities", "Similarity", "ZeroShotClassify", "ListTasks"]
    ),
    payload=st.binary(max_size=300),
)
def test_fuzz_raw_bytes(target: Target, method: str, payload: bytes) -> None:
    call = target.channel.unary_unary(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )
    target.check(f"raw {method}", lambda: call(payload, timeout=CALL_TIMEOUT_S))


# --- garbage in the job streams -------------------------------------------------------------


class DeadLetters:
    """The (stream, entry id) pairs seen in the dead-letter stream so far."""

    def __init__(self, r: redis.Redis) -> None:
        self._r = r
        self._last = b"0-0"
        self.seen: dict[tuple[bytes, bytes], bytes] = {}

    def wait_for(self, wanted: set[tuple[bytes, bytes]], timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not wanted <= self.seen.keys():
            assert time.monotonic() < deadline, f"not dead-lettered: {wanted - self.seen.keys()}"
            for entry_id, fields in self._r.xrange(
                keys.DEAD_LETTER_STREAM, f"({self._last.decode()}", "+"
            ):
                self._last = entry_id
                if b"stream" in fields and b"entry_id" in fields:
                    self.seen[(fields[b"stream"], fields[b"entry_id"])] = fields.get(b"reason", b"")
            time.sleep(0.02)


@pytest.fixture(scope="module")
def dead(target: Target) -> DeadLetters:
    r = redis.Redis.from_url(target.cluster.redis_url)
    letters = DeadLetters(r)
    return letters


def _valid_fields(head: str = "embed") -> dict[str, str]:
    return {
        "v": "1", "id": "fuzz", "reply_to": keys.reply_stream("fuzz-nobody"),
        "deadline_ms": str(int(time.time() * 1000) + 60_000), "kind": "embed", "head": head,
        "texts": '["hello"]', "top_k": "1", "enqueued_ms": "0", "params": "{}",
    }  # fmt: skip


def _broken(**changes: str | bytes | None) -> dict[str, str | bytes]:
    fields: dict[str, str | bytes] = dict(_valid_fields())
    for name, value in changes.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    return fields


GARBAGE = [
    ("missing fields", "embed", {"garbage": "yes"}),
    ("unknown schema version", "embed", _broken(v="2")),
    ("no schema version", "sentiment", _broken(v=None)),
    ("deadline not an integer", "embed", _broken(deadline_ms="soon")),
    ("top_k a float", "embed", _broken(top_k="1.5")),
    ("negative top_k", "embed", _broken(top_k="-1")),
    ("texts not JSON", "embed", _broken(texts="[hello")),
    ("texts an object", "embed", _broken(texts='{"a": 1}')),
    ("texts of numbers", "embed", _broken(texts="[1, 2]")),
    ("no texts", "embed", _broken(texts="[]")),
    ("params a list", "embed", _broken(params="[]")),
    ("unknown kind", "embed", _broken(kind="explode")),
    ("no id", "embed", _broken(id=None)),
    ("no reply_to", "embed", _broken(reply_to=None)),
    ("id not UTF-8", "embed", _broken(id=NOT_UTF8)),
    ("head of another stream", "embed", _broken(head="sentiment")),
    ("huge texts field", "embed", _broken(texts="[" + "1," * 500_000 + "1]")),
    ("huge id not UTF-8", "_analyze", _broken(id=b"\xff" * 1_000_000, head="_analyze")),
    ("reply_to a string key", "embed", _broken(reply_to=keys.CATALOG_KEY, v="0")),
    ("reply_to a job stream", "embed", _broken(reply_to=keys.task_stream("embed"), v="0")),
]


def test_the_valid_template_is_valid() -> None:
    fields = {k.encode(): v.encode() for k, v in _valid_fields().items()}
    assert Job.decode(fields).head == "embed"


@pytest.mark.parametrize(("reason", "head", "fields"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_entries_are_dead_lettered(
    target: Target, dead: DeadLetters, reason: str, head: str, fields: dict[str, Any]
) -> None:
    r = redis.Redis.from_url(target.cluster.redis_url)
    stream = keys.task_stream(head)
    entry_id = r.xadd(stream, fields)
    dead.wait_for({(stream.encode(), entry_id)})
    assert dead.seen[(stream.encode(), entry_id)]  # with its reason


field_name = st.one_of(st.sampled_from(list(_valid_fields())), st.binary(min_size=1, max_size=12))
field_value = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(["1", "0", "-1", "embed", "[]", '["x"]', "{}", "null", ""]).map(str.encode),
    st.text(any_char, max_size=20).map(lambda s: s.encode()),
)


@settings(FUZZ, max_examples=40)
@given(
    mutations=st.dictionaries(
        field_name, st.one_of(st.none(), field_value), min_size=1, max_size=6
    ),
    head=st.sampled_from(["embed", "sentiment", "_analyze"]),
)
def test_fuzz_garbage_entries(
    target: Target, dead: DeadLetters, mutations: dict[Any, bytes | None], head: str
) -> None:
    fields: dict[bytes, bytes] = {k.encode(): v.encode() for k, v in _valid_fields(head).items()}
    for name, value in mutations.items():
        key = name if isinstance(name, bytes) else name.encode()
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    assume(fields)
    try:
        job = Job.decode(fields)
        assume(job.head != head)  # a valid job for this stream is work, not garbage
    except MalformedMessage:
        pass
    r = redis.Redis.from_url(target.cluster.redis_url)
    stream = keys.task_stream(head)
    entry_id = r.xadd(stream, fields)
    dead.wait_for({(stream.encode(), entry_id)})


def test_still_serving_after_everything(target: Target) -> None:
    for proc in target.procs():
        assert proc.popen.poll() is None, proc.name
    response = target.stub.Embed(pb.EmbedRequest(texts=["still alive"]), timeout=30)
    assert len(response.embeddings) == 1


def _embed_of_size(size: int) -> pb.EmbedRequest:
    """An EmbedRequest whose serialized form is exactly `size` bytes."""
    n = size
    while (request := pb.EmbedRequest(texts=["x" * n])).ByteSize() > size:
        n -= 1
    assert request.ByteSize() == size
    return request


def test_message_size_limit_is_exact(target: Target) -> None:
    """At exactly max_message_bytes the request reaches validation (its text is too long
    for MAX_CHARS); one byte more and gRPC refuses it before any handler runs."""
    with pytest.raises(grpc.RpcError) as at_limit:
        target.stub.Embed(_embed_of_size(MAX_MESSAGE_BYTES), timeout=CALL_TIMEOUT_S)
    assert at_limit.value.code() == Code.INVALID_ARGUMENT
    assert f"at most {MAX_CHARS}" in (at_limit.value.details() or "")
    with pytest.raises(grpc.RpcError) as past:
        target.stub.Embed(_embed_of_size(MAX_MESSAGE_BYTES + 1), timeout=CALL_TIMEOUT_S)
    assert past.value.code() == Code.RESOURCE_EXHAUSTED
