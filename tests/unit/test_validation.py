"""Gateway request checks, at exactly each limit and one past it."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidArgument, NotFound, Unavailable
from gateway.plans import ANALYZE_TEXTS_PER_JOB, analyze_jobs
from gateway.settings import GatewaySettings
from gateway.validation import (
    check_candidates,
    check_head,
    check_heads,
    check_labels,
    check_texts,
    check_top_k,
)
from model.anonymize import Style
from model.manifest import EncoderSpec, HeadSpec, Manifest

SETTINGS = GatewaySettings(max_texts_per_request=3, max_text_chars=5)
SENTIMENT = HeadSpec("sentiment", "classification", "1", ("neg", "pos"), "w.npz")
CATALOG = Manifest(
    encoder=EncoderSpec("enc", "1", 4, 8, "m.onnx", "t.json"),
    heads=(HeadSpec("embed", "embedding", "1"), SENTIMENT),
)


def test_texts_at_the_limits_pass() -> None:
    assert check_texts(["12345", "a", "é東🙂"], SETTINGS) == ("12345", "a", "é東🙂")


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "texts is empty"),
        (["a", "b", "c", "d"], "4 items; at most 3"),
        (["123456"], r"texts\[0\] has 6 characters; at most 5"),
        (["ok", ""], r"texts\[1\] is empty"),
    ],
)
def test_texts_past_the_limits_fail(texts: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_texts(texts, SETTINGS)


def test_heads() -> None:
    assert check_head("sentiment", "classification", CATALOG, "Classify") is SENTIMENT
    with pytest.raises(NotFound, match="served: sentiment"):
        check_head("topic", "classification", CATALOG, "Classify")
    with pytest.raises(InvalidArgument, match="embedding head"):
        check_head("embed", "classification", CATALOG, "Classify")
    with pytest.raises(InvalidArgument, match="head is empty"):
        check_head("", "classification", CATALOG, "Classify")
    with pytest.raises(Unavailable, match="no worker"):
        check_head("sentiment", "classification", None, "Classify")


@pytest.mark.parametrize(("top_k", "expected"), [(0, 1), (1, 1), (2, 2), (3, 2)])
def test_top_k(top_k: int, expected: int) -> None:
    assert check_top_k(top_k, SENTIMENT) == expected


def test_negative_top_k() -> None:
    with pytest.raises(InvalidArgument, match="top_k is -1"):
        check_top_k(-1, SENTIMENT)


LIMITS = GatewaySettings(max_candidates=3, max_labels=3, max_heads_per_request=2)
EMBED = HeadSpec("embed", "embedding", "1")
TWO_HEADS = Manifest(encoder=CATALOG.encoder, heads=(EMBED, SENTIMENT))


def test_candidates_at_the_limit_pass_and_one_past_fails() -> None:
    assert check_candidates("q", ["a", "b", "c"], LIMITS) == ("q", "a", "b", "c")
    with pytest.raises(InvalidArgument, match="candidates has 4 items; at most 3"):
        check_candidates("q", ["a", "b", "c", "d"], LIMITS)


def test_labels_at_the_limit_pass_and_one_past_fails() -> None:
    assert check_labels(["a", "b", "c"], "", LIMITS) == ["a", "b", "c"]
    with pytest.raises(InvalidArgument, match="labels has 4 items; at most 3"):
        check_labels(["a", "b", "c", "d"], "", LIMITS)
    with pytest.raises(InvalidArgument, match="labels has 1 items; send at least 2"):
        check_labels(["a"], "", LIMITS)


def test_heads_at_the_limit_pass_and_one_past_fails() -> None:
    kinds = ("embedding", "classification")
    assert [h.name for h in check_heads(["embed", "sentiment"], kinds, TWO_HEADS, LIMITS)] == [
        "embed",
        "sentiment",
    ]
    with pytest.raises(InvalidArgument, match="heads has 3 items; at most 2"):
        check_heads(["embed", "sentiment", "topic"], kinds, TWO_HEADS, LIMITS)


def test_query_and_template_obey_the_character_limit() -> None:
    assert check_candidates("12345", ["a"], SETTINGS)[0] == "12345"
    with pytest.raises(InvalidArgument, match="query has 6 characters; at most 5"):
        check_candidates("123456", ["a"], SETTINGS)
    with pytest.raises(InvalidArgument, match="hypothesis_template is too long"):
        check_labels(["a", "b"], "{} 123", SETTINGS)


def test_analyze_groups_texts_into_jobs_but_keeps_pseudonyms_in_one() -> None:
    texts = [f"text {i}" for i in range(2 * ANALYZE_TEXTS_PER_JOB + 1)]
    jobs = analyze_jobs(texts, {})
    assert [len(j) for j in jobs] == [ANALYZE_TEXTS_PER_JOB, ANALYZE_TEXTS_PER_JOB, 1]
    assert [t for job in jobs for t in job] == texts
    numbered = {"anonymize": {"style": Style.PSEUDONYM}}
    assert analyze_jobs(texts, numbered) == [tuple(texts)]
