"""Anonymize: the replacement function (model/anonymize.py), the checks of its requests
and jobs, and the task through a real gateway and worker, as an RPC, inside Analyze and
Pipeline, and from the clients."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client import TaskMuxClient

from gateway.errors import InvalidArgument
from gateway.validation import check_entity_labels, check_style
from model.anonymize import Pseudonyms, Span, Style, anonymize, placeholder, replacer
from model.manifest import HeadSpec
from model.tags import entity_types, split_tag
from router import keys
from router.messages import SCHEMA_VERSION, Job, MalformedMessage
from tests.harness import Cluster, serving, wait_for_catalog, wait_until

ALL = ("PER", "ORG", "LOC", "MISC")
INTEGRATION = pytest.mark.integration


def _span(text: str, surface: str, label: str, occurrence: int = 0) -> Span:
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(surface, start + 1)
    return Span(label, start, start + len(surface))


def _restored(original: str, result: pb.AnonymizedText | object) -> str:
    """The original rebuilt from the output and the spans: proves every offset."""
    text: str = result.text  # type: ignore[attr-defined]
    out, position = [], 0
    for s in result.spans:  # type: ignore[attr-defined]
        out.append(text[position : s.output_start])
        out.append(original[s.start : s.end])
        position = s.output_end
    out.append(text[position:])
    return "".join(out)


# ---------------------------------------------------------------- the replacement function


def test_placeholders_replace_each_span_and_keep_the_rest() -> None:
    text = "Angela Merkel met Siemens in Berlin."
    spans = [
        _span(text, "Angela Merkel", "PER"),
        _span(text, "Siemens", "ORG"),
        _span(text, "Berlin", "LOC"),
    ]
    result = anonymize(text, spans, ALL, placeholder)
    assert result.text == "[PER] met [ORG] in [LOC]."
    assert [(s.label, s.start, s.end) for s in result.spans] == [
        (s.label, s.start, s.end) for s in spans
    ]
    for s in result.spans:
        assert result.text[s.output_start : s.output_end] == f"[{s.label}]"
    assert _restored(text, result) == text


def test_only_the_labels_asked_for_are_replaced() -> None:
    text = "Angela Merkel visited Paris."
    spans = [_span(text, "Angela Merkel", "PER"), _span(text, "Paris", "LOC")]
    result = anonymize(text, spans, {"LOC"}, placeholder)
    assert result.text == "Angela Merkel visited [LOC]."
    assert [s.label for s in result.spans] == ["LOC"]


def test_spans_in_any_order_come_out_in_text_order() -> None:
    text = "Paris and Rome"
    spans = [_span(text, "Rome", "LOC"), _span(text, "Paris", "LOC")]
    result = anonymize(text, spans, ALL, placeholder)
    assert result.text == "[LOC] and [LOC]"
    assert [s.start for s in result.spans] == [0, 10]


def test_overlapping_spans_are_replaced_as_one_with_the_first_label() -> None:
    text = "New York Times Square"
    spans = [Span("LOC", 9, 21), Span("ORG", 0, 14), Span("PER", 4, 8)]  # nested too
    result = anonymize(text, spans, ALL, placeholder)
    assert result.text == "[ORG]"
    assert [(s.label, s.start, s.end, s.output_start, s.output_end) for s in result.spans] == [
        ("ORG", 0, 21, 0, 5)
    ]
    # Same start: the longer one leads.
    same_start = anonymize(text, [Span("PER", 0, 3), Span("LOC", 0, 8)], ALL, placeholder)
    assert same_start.text == "[LOC] Times Square"


def test_a_span_not_asked_for_does_not_widen_one_that_is() -> None:
    text = "New York Times Square"
    result = anonymize(text, [Span("ORG", 0, 14), Span("LOC", 9, 21)], {"LOC"}, placeholder)
    assert result.text == "New York [LOC]"


def test_adjacent_spans_stay_two_replacements() -> None:
    text = "JohnSmith"
    spans = [Span("PER", 0, 4), Span("PER", 4, 9)]
    result = anonymize(text, spans, ALL, Pseudonyms())
    assert result.text == "PER_1PER_2"
    assert [(s.output_start, s.output_end) for s in result.spans] == [(0, 5), (5, 10)]


def test_pseudonyms_are_consistent_across_texts_and_numbered_per_label() -> None:
    replace = Pseudonyms()
    first = "Angela Merkel met Emmanuel Macron in Paris."
    second = "Paris welcomed Angela Merkel; Paris the person was absent."
    a = anonymize(
        first,
        [
            _span(first, "Angela Merkel", "PER"),
            _span(first, "Emmanuel Macron", "PER"),
            _span(first, "Paris", "LOC"),
        ],
        ALL,
        replace,
    )
    b = anonymize(
        second,
        [
            _span(second, "Paris", "LOC"),
            _span(second, "Angela Merkel", "PER"),
            _span(second, "Paris", "PER", occurrence=1),
        ],
        ALL,
        replace,
    )
    assert a.text == "PER_1 met PER_2 in LOC_1."
    assert b.text == "LOC_1 welcomed PER_1; PER_3 the person was absent."
    # A new request starts over.
    fresh = anonymize(
        second, [_span(second, "Angela Merkel", "PER")], ALL, replacer(Style.PSEUDONYM)
    )
    assert fresh.text == "Paris welcomed PER_1; Paris the person was absent."


@pytest.mark.parametrize(
    "prefix",
    ["", "東京🙂 ", "\U0001d49c😀😀 ", "e\u0301 ", "👩\u200d👩\u200d👧 "],
    ids=["ascii", "cjk", "astral", "combining", "zwj"],
)
def test_offsets_are_code_points_on_non_ascii_text(prefix: str) -> None:
    text = prefix + "José Müller visited Zürich with Łukasz."
    spans = [
        _span(text, "José Müller", "PER"),
        _span(text, "Zürich", "LOC"),
        _span(text, "Łukasz", "PER"),
    ]
    result = anonymize(text, spans, ALL, replacer(Style.PSEUDONYM))
    assert result.text == prefix + "PER_1 visited LOC_1 with PER_2."
    assert result.spans[0].start == len(prefix)
    for span, replaced in zip(spans, result.spans, strict=True):
        assert (replaced.start, replaced.end) == (span.start, span.end)
        assert text[replaced.start : replaced.end] not in result.text
    assert _restored(text, result) == text


@pytest.mark.parametrize("span", [Span("PER", -1, 2), Span("PER", 3, 3), Span("PER", 2, 99)])
def test_a_span_outside_the_text_is_refused(span: Span) -> None:
    with pytest.raises(ValueError, match="empty or outside"):
        anonymize("short", [span], ALL, placeholder)


@given(
    text=st.text(min_size=1, max_size=40),
    cuts=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8), st.sampled_from(ALL))),
    pseudonyms=st.booleans(),
)
def test_any_spans_keep_offsets_and_text_between_them(
    text: str, cuts: list[tuple[int, int, str]], pseudonyms: bool
) -> None:
    spans = [
        Span(label, start, min(start + size, len(text)))
        for start, size, label in cuts
        if start < len(text)
    ]
    result = anonymize(text, spans, {"PER", "LOC"}, Pseudonyms() if pseudonyms else placeholder)
    assert _restored(text, result) == text
    ends = [(s.start, s.end) for s in result.spans]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends))  # sorted, disjoint
    covered = {i for s in spans if s.label in {"PER", "LOC"} for i in range(s.start, s.end)}
    assert covered == {i for s in result.spans for i in range(s.start, s.end)}


# ---------------------------------------------------------------- tags, checks, job schema


def test_entity_types_of_bio_and_io_heads() -> None:
    assert entity_types(["O", "LOC", "MISC", "ORG", "PER"]) == ("LOC", "MISC", "ORG", "PER")
    assert entity_types(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]) == ("PER", "LOC")
    assert split_tag("B-PER") == ("B", "PER") and split_tag("O") == ("", None)


def test_labels_are_checked_against_the_heads_entity_types() -> None:
    head = HeadSpec("entities", "token_classification", "1", ("O", "LOC", "MISC", "ORG", "PER"))
    assert check_entity_labels([], head) == ["PER", "ORG", "LOC"]
    assert check_entity_labels(["MISC"], head) == ["MISC"]
    with pytest.raises(InvalidArgument, match="its labels: LOC, MISC, ORG, PER"):
        check_entity_labels(["PER", "DATE"], head)
    with pytest.raises(InvalidArgument, match="duplicate"):
        check_entity_labels(["PER", "PER"], head)
    with pytest.raises(InvalidArgument, match="none of PER, ORG, LOC"):
        check_entity_labels([], HeadSpec("drugs", "token_classification", "1", ("O", "B-DRUG")))


def test_styles() -> None:
    assert check_style(pb.ANONYMIZE_STYLE_UNSPECIFIED) is Style.PLACEHOLDER
    assert check_style(pb.ANONYMIZE_STYLE_PSEUDONYM) is Style.PSEUDONYM
    with pytest.raises(InvalidArgument, match="ANONYMIZE_STYLE_PSEUDONYM"):
        check_style(7)


def _job_fields(kind: str, params: str) -> dict[bytes, bytes]:
    fields = {
        "v": SCHEMA_VERSION,
        "id": "j1",
        "reply_to": keys.reply_stream("g1"),
        "deadline_ms": "1",
        "kind": kind,
        "head": "entities",
        "texts": '["x"]',
        "top_k": "1",
        "enqueued_ms": "0",
        "params": params,
    }
    return {k.encode(): v.encode() for k, v in fields.items()}


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("anonymize", '{"labels": ["PER"]}'),
        ("anonymize", '{"labels": ["PER"], "style": "shuffle"}'),
        ("anonymize", '{"labels": [], "style": "placeholder"}'),
        (
            "analyze",
            '{"heads": ["entities"], "anonymize": {"labels": ["PER"], "style": "pseudonym"}}',
        ),
        ("analyze", '{"heads": ["entities"], "anonymize": {"labels": {"entities": ["PER"]}}}'),
    ],
)
def test_a_job_with_bad_anonymize_params_does_not_decode(kind: str, params: str) -> None:
    with pytest.raises(MalformedMessage):
        Job.decode(_job_fields(kind, params))


def test_jobs_with_anonymize_params_decode() -> None:
    job = Job.decode(_job_fields("anonymize", '{"labels": ["PER"], "style": "pseudonym"}'))
    assert job.params["style"] == Style.PSEUDONYM
    options = '{"labels": {"entities": ["PER"]}, "style": "placeholder"}'
    analyze = '{"heads": ["entities"], "anonymize": ' + options + "}"
    assert Job.decode(_job_fields("analyze", analyze)).params["anonymize"]["style"] == "placeholder"


# ---------------------------------------------------------------- through a gateway and worker

# CoNLL-style news sentences with well-known names; the head finds every one of these.
SENTENCES = [
    "Angela Merkel met Emmanuel Macron in Paris on Monday.",
    "Microsoft and Google opened offices in London.",
    "José Müller visited Zürich with Angela Merkel.",
    "東京🙂 Barack Obama spoke at Harvard University in Boston.",
    "Angela Merkel left Paris for Berlin.",
]
Stub = taskmux_pb2_grpc.TaskMuxStub


@pytest.fixture(scope="module")
def address(cluster: Cluster, model_repo: Path) -> str:
    _, address = cluster.start_gateway()
    wait_until(lambda: serving(address), 30, "gateway SERVING")
    wait_for_catalog(address, model_repo)
    return address


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[Stub]:
    with grpc.insecure_channel(address) as channel:
        yield taskmux_pb2_grpc.TaskMuxStub(channel)


def _anonymize(stub: Stub, texts: list[str], **fields: object) -> pb.AnonymizeResponse:
    return stub.Anonymize(pb.AnonymizeRequest(texts=texts, **fields), timeout=30)  # type: ignore[arg-type]


def _assert_hidden(texts: list[str], response: pb.AnonymizeResponse, labels: set[str]) -> None:
    assert len(response.results) == len(texts)
    for text, result in zip(texts, response.results, strict=True):
        assert _restored(text, result) == text  # offsets hold, everything else is kept
        for s in result.spans:
            assert s.label in labels
            assert text[s.start : s.end] not in result.text, (text, result.text)


@INTEGRATION
def test_no_replaced_span_leaks_and_spans_are_the_entities(stub: Stub) -> None:
    response = _anonymize(stub, SENTENCES)
    assert (response.head, response.model) == ("entities", "all-MiniLM-L6-v2")
    _assert_hidden(SENTENCES, response, {"PER", "ORG", "LOC"})
    entities = stub.ExtractEntities(pb.ExtractEntitiesRequest(texts=SENTENCES), timeout=30)
    for found, result in zip(entities.results, response.results, strict=True):
        wanted = [(e.label, e.start, e.end) for e in found.entities if e.label != "MISC"]
        assert [(s.label, s.start, s.end) for s in result.spans] == wanted
        for s in result.spans:
            assert result.text[s.output_start : s.output_end] == f"[{s.label}]"
    for name in ["Angela Merkel", "Emmanuel Macron", "José Müller", "Zürich", "Barack Obama"]:
        assert all(name not in r.text for r in response.results), name
    # Code points after CJK and an emoji (UTF-8 bytes or UTF-16 units would be larger).
    obama = SENTENCES[3].index("Barack Obama")
    assert ("PER", obama, obama + 12) in [
        (s.label, s.start, s.end) for s in response.results[3].spans
    ]


@INTEGRATION
def test_labels_filter(stub: Stub) -> None:
    response = _anonymize(stub, SENTENCES, labels=["LOC"])
    _assert_hidden(SENTENCES, response, {"LOC"})
    assert "Angela Merkel" in response.results[0].text
    assert "[LOC]" in response.results[0].text and "Paris" not in response.results[0].text


@INTEGRATION
def test_pseudonyms_are_consistent_within_a_request(stub: Stub) -> None:
    style = pb.ANONYMIZE_STYLE_PSEUDONYM
    response = _anonymize(stub, SENTENCES, style=style)
    _assert_hidden(SENTENCES, response, {"PER", "ORG", "LOC"})
    by_surface: dict[tuple[str, str], set[str]] = {}
    for text, result in zip(SENTENCES, response.results, strict=True):
        for s in result.spans:
            key = (s.label, text[s.start : s.end])
            by_surface.setdefault(key, set()).add(result.text[s.output_start : s.output_end])
    assert all(len(names) == 1 for names in by_surface.values()), by_surface
    names = [next(iter(n)) for n in by_surface.values()]
    assert len(set(names)) == len(names)  # different surfaces, different pseudonyms
    assert by_surface[("PER", "Angela Merkel")] == {"PER_1"}
    assert response.results[4].text.startswith("PER_1 left LOC_1")


@INTEGRATION
@pytest.mark.parametrize("style", [pb.ANONYMIZE_STYLE_PLACEHOLDER, pb.ANONYMIZE_STYLE_PSEUDONYM])
def test_analyze_and_pipeline_give_the_rpcs_result(stub: Stub, style: int) -> None:
    texts = [*SENTENCES, SENTENCES[0]]  # a repeated text too
    options = pb.AnonymizeOptions(labels=["PER", "LOC"], style=style)  # type: ignore[arg-type]
    rpc = _anonymize(stub, texts, labels=options.labels, style=style)
    request = pb.AnalyzeRequest(texts=texts, heads=["sentiment", "entities"], anonymize=options)
    results = list(stub.Analyze(request, timeout=30))
    assert len(results) == 2 * len(texts)
    anonymized = {r.text_index: r.anonymized for r in results if r.head == "entities"}
    assert all(r.WhichOneof("result") == "classification" for r in results if r.head == "sentiment")
    assert [anonymized[i] for i in range(len(texts))] == list(rpc.results)
    task = pb.AnonymizeRequest(texts=texts, labels=options.labels, style=style)  # type: ignore[arg-type]
    (answer,) = stub.Pipeline(iter([pb.PipelineRequest(id="a", anonymize=task)]), timeout=30)
    assert answer.id == "a" and answer.anonymize == rpc


@INTEGRATION
def test_the_client_anonymizes(address: str) -> None:
    with TaskMuxClient(address) as client:
        response = client.anonymize(SENTENCES[:2], labels=["ORG"])
        results = list(
            client.analyze(
                SENTENCES[:2], ["entities"], anonymize=pb.AnonymizeOptions(labels=["ORG"])
            )
        )
    _assert_hidden(SENTENCES[:2], response, {"ORG"})
    assert "[ORG] and [ORG] opened" in response.results[1].text
    assert sorted((r.text_index, r.anonymized.text) for r in results) == [
        (i, r.text) for i, r in enumerate(response.results)
    ]


@INTEGRATION
@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"labels": ["PER", "DATE"]}, grpc.StatusCode.INVALID_ARGUMENT, "LOC, MISC, ORG, PER"),
        ({"style": 7}, grpc.StatusCode.INVALID_ARGUMENT, "ANONYMIZE_STYLE_PSEUDONYM (2)"),
        ({"head": "sentiment"}, grpc.StatusCode.INVALID_ARGUMENT, "needs a token_classification"),
        ({"head": "nope"}, grpc.StatusCode.NOT_FOUND, "not served"),
        ({"texts": []}, grpc.StatusCode.INVALID_ARGUMENT, "texts is empty"),
        ({"texts": [" "]}, grpc.StatusCode.INVALID_ARGUMENT, "texts[0] is empty"),
    ],
)
def test_bad_requests_are_refused(
    stub: Stub, fields: dict[str, object], code: grpc.StatusCode, message: str
) -> None:
    request = pb.AnonymizeRequest(**({"texts": ["Angela Merkel"]} | fields))  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as info:
        stub.Anonymize(request, timeout=30)
    assert info.value.code() == code and message in (info.value.details() or "")
    (answer,) = stub.Pipeline(iter([pb.PipelineRequest(id="x", anonymize=request)]), timeout=30)
    assert answer.error.status == code.name and message in answer.error.message


@INTEGRATION
@pytest.mark.parametrize(
    ("heads", "options", "message"),
    [
        (["sentiment"], pb.AnonymizeOptions(), "names no token_classification head"),
        (["entities"], pb.AnonymizeOptions(labels=["DATE"]), "LOC, MISC, ORG, PER"),
        (["entities"], pb.AnonymizeOptions(style=9), "is not an AnonymizeStyle"),  # type: ignore[arg-type]
    ],
)
def test_bad_analyze_options_are_refused(
    stub: Stub, heads: list[str], options: pb.AnonymizeOptions, message: str
) -> None:
    request = pb.AnalyzeRequest(texts=["Angela Merkel"], heads=heads, anonymize=options)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Analyze(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")
