"""The head trainer: the generic fitter, the leak-free held-out split, and bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from taskmux_api.kinds import HeadKind

from model.encoder import l2_normalize
from model.heads import LinearClassifierHead
from model.manifest import HeadSpec
from taskmux.modelrepo.datasets import TrainingDataError
from taskmux.modelrepo.fit import accuracy, fit_softmax_regression
from taskmux.modelrepo.recipe import train_shipped
from taskmux.modelrepo.sentiment import (
    SENTIMENT,
    read_labelled_tsv,
    sentiment_split,
    whole_sentence_mask,
)

POSITIVE = ["wonderful", "moving", "brilliant", "delightful", "charming"]
NEGATIVE = ["dull", "tedious", "awful", "boring", "clumsy"]
SUBJECTS = ["the film", "this movie", "the script", "the acting", "the ending", "its story"]


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated classes of unit vectors in 32 dimensions."""
    centers = np.random.default_rng(123).normal(size=(3, 32))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    points = centers[labels] + 0.3 * rng.normal(size=(n, 32))
    return l2_normalize(points.astype(np.float32)), labels


def test_fit_learns_a_separable_three_class_problem() -> None:
    x, y = blobs(600, seed=1)
    weight, bias = fit_softmax_regression(x, y, 3, seed=0)
    assert weight.shape == (3, 32) and weight.dtype == np.float32
    assert bias.shape == (3,) and bias.dtype == np.float32
    assert accuracy(x, y, weight, bias) >= 0.99
    x_new, y_new = blobs(300, seed=2)
    assert accuracy(x_new, y_new, weight, bias) >= 0.98


def test_fit_is_deterministic() -> None:
    x, y = blobs(300, seed=1)
    first = fit_softmax_regression(x, y, 3, epochs=5, batch_size=64, seed=7)
    second = fit_softmax_regression(x, y, 3, epochs=5, batch_size=64, seed=7)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


@pytest.mark.parametrize(
    ("labels", "num_classes"),
    [([0, 1, 3], 3), ([0, 1], 3), ([0, 0, 0], 1), ([0.0, 1.0, 1.0], 2)],
)
def test_fit_rejects_an_ill_posed_problem(labels: list[float], num_classes: int) -> None:
    with pytest.raises(ValueError):
        fit_softmax_regression(np.ones((3, 4)), labels, num_classes)


def test_whole_sentences_are_the_maximal_rows() -> None:
    texts = ["the film is dull .", "the film", "is dull", "a b c", "b"]
    context = ["the film is dull . really", "x y"]
    assert whole_sentence_mask(texts).tolist() == [True, False, False, True, False]
    assert whole_sentence_mask(texts, context).tolist() == [False, False, False, True, False]


def synthetic_sst(folder: Path, *, sentences: int, offset: int = 0) -> None:
    """An SST-like TSV: whole sentences and their sub-phrases, labelled by sentiment."""
    rows = []
    for i in range(offset, offset + sentences):
        label = i % 2
        words = (POSITIVE if label else NEGATIVE)[i % 5], (POSITIVE if label else NEGATIVE)[i % 3]
        subject = SUBJECTS[i % len(SUBJECTS)]
        sentence = f"{subject} of review {i} is {words[0]} and {words[1]} ."
        rows += [(sentence, label), (f"{words[0]} and {words[1]}", label), (words[0], label)]
        rows += [(f"review {i} is {words[0]}", label), (subject, 1)]
    lines = ["sentence\tlabel"] + [f"{text} \t{label}" for text, label in rows]
    (folder / "sst2").mkdir(parents=True, exist_ok=True)
    name = "dev.tsv" if offset else "train.tsv"
    (folder / "sst2" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    synthetic_sst(tmp_path / "data", sentences=80)
    synthetic_sst(tmp_path / "data", sentences=20, offset=1000)
    return tmp_path / "data"


def test_heldout_split_has_no_leakage(data_dir: Path) -> None:
    train = read_labelled_tsv(data_dir / "sst2" / "train.tsv")
    dev = read_labelled_tsv(data_dir / "sst2" / "dev.tsv")
    plan = sentiment_split(train, dev, seed=0)
    split = plan.split
    heldout = [train.texts[i] for i in split.heldout]
    dev_sentences = [t for t, whole in zip(dev.texts, plan.dev_sentences, strict=True) if whole]

    assert plan.train_sentences.sum() == 80 and len(dev_sentences) == 20
    assert len(heldout) == 8 and all(plan.train_sentences[i] for i in split.heldout)
    assert sorted(split.train + split.heldout + split.leaked) == list(range(len(train.texts)))
    assert split.leaked, "shared sub-phrases of held-out sentences must be dropped"
    for i in split.train:
        text = train.texts[i]
        assert not any(text in sentence for sentence in heldout + dev_sentences), text
    assert sentiment_split(train, dev, seed=0).split == split
    assert sentiment_split(train, dev, seed=1).split.heldout != split.heldout


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("train.tsv", "sentence\tlabel\ngood\t1\nfine\t1\n", "need two labels"),
        ("train.tsv", "text\tlabel\ngood\t1\nbad\t0\n", "lacks column"),
        ("train.tsv", "", "empty file"),
        ("train.tsv", "sentence\tlabel\n", "no data rows"),
        ("train.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n", "is not in 0..1"),
        ("dev.tsv", "sentence\tlabel\ngood\n", "1 fields"),
        ("dev.tsv", None, "no such file"),
    ],
)
def test_bad_data_raises_and_writes_nothing(
    data_dir: Path, tmp_path: Path, file: str, content: str | None, message: str
) -> None:
    path = data_dir / "sst2" / file
    if content is None:
        path.unlink()
    else:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "head"
    with pytest.raises(TrainingDataError, match=message) as err:
        train_shipped(SENTIMENT, tmp_path / "no-repo", data_dir, out_dir=out)
    assert isinstance(err.value, ValueError)
    assert not out.exists()


def test_train_sentiment_writes_a_head_the_worker_loads(
    model_repo: Path, data_dir: Path, tmp_path: Path
) -> None:
    first = train_shipped(SENTIMENT, model_repo, data_dir, out_dir=tmp_path / "a")
    second = train_shipped(SENTIMENT, model_repo, data_dir, out_dir=tmp_path / "b")
    assert first["metrics"] == second["metrics"]
    for name in ("head.json", "weights.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    meta = json.loads((tmp_path / "a" / "head.json").read_text(encoding="utf-8"))
    assert meta["name"] == "sentiment" and meta["kind"] == HeadKind.CLASSIFICATION
    assert meta["labels"] == ["negative", "positive"]
    assert meta["metrics"]["heldout_examples"] == 8
    assert all(type(v) in (int, float) for v in meta["metrics"].values())
    assert meta["metrics"]["heldout_accuracy"] >= 0.75
    spec = HeadSpec(
        name="sentiment",
        kind=HeadKind.CLASSIFICATION,
        version="1",
        labels=tuple(meta["labels"]),
        weights_file="weights.npz",
    )
    head = LinearClassifierHead(spec, tmp_path / "a", 384)
    assert head.params["weight"].shape == (2, 384) and head.params["bias"].shape == (2,)
    assert not list((tmp_path / "a").glob("*.tmp"))
