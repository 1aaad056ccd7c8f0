"""Gateway request checks, at exactly each limit and one past it."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidArgument, NotFound, Unavailable
from gateway.settings import GatewaySettings
from gateway.validation import check_head, check_texts, check_top_k
from taskmux.modelrepo.manifest import EncoderSpec, HeadSpec, Manifest

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
