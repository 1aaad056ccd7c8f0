"""Single-thread replicas of the encoder on the real ONNX model: a big batch cut in slices
run at once gives what the one multi-thread session gives, in the same order."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.encoder import BranchRows, Encoder, l2_normalize
from model.manifest import EMBEDDING, MULTITASK, EncoderSpec, load_manifest
from model.replicas import (
    MAX_AUTO_REPLICAS,
    MIN_REPLICA_ROWS,
    physical_cores,
    replica_count,
    slices,
)

CPU = ["CPUExecutionProvider"]
WORDS = [
    "the",
    "market",
    "rose",
    "after",
    "strong",
    "earnings",
    "from",
    "apple",
    "and",
    "google",
    "in",
    "new",
    "york",
]
# Mixed lengths, out of length order, enough rows for the replicas.
TEXTS = [" ".join(WORDS[: 1 + (i * 7) % len(WORDS)]) + f" {i}" for i in range(24)]


@pytest.fixture(scope="module")
def spec(model_repo: Path) -> EncoderSpec:
    return load_manifest(model_repo).encoder


@pytest.fixture(scope="module")
def plain(model_repo: Path, spec: EncoderSpec) -> Encoder:
    return Encoder(model_repo, spec, providers=CPU)


@pytest.fixture(scope="module")
def replicated(model_repo: Path, spec: EncoderSpec) -> Iterator[Encoder]:
    encoder = Encoder(model_repo, spec, providers=CPU, replicas=2)
    yield encoder
    encoder.close()


@pytest.fixture
def slice_calls(replicated: Encoder, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Rows of each slice the replicas ran, one list per batch."""
    assert replicated.replicas is not None
    calls: list[list[int]] = []
    original = replicated.replicas.map

    def spy(fn: Callable[..., Any], items: list[list[int]]) -> list[Any]:
        calls.append([len(rows) for rows in items])
        return original(fn, items)

    monkeypatch.setattr(replicated.replicas, "map", spy)
    return calls


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Row for row the same vectors (rows a branch was not asked for are zero in both)."""
    assert a.shape == b.shape
    computed = np.abs(b).sum(axis=1) > 0
    assert ((np.abs(a).sum(axis=1) > 0) == computed).all()
    assert (l2_normalize(a[computed]) * l2_normalize(b[computed])).sum(axis=1).min() >= 0.99999


def test_slices_are_contiguous_non_empty_and_about_equal_in_tokens() -> None:
    lengths = [3, 3, 4, 5, 5, 6, 8, 9, 12, 20]
    cuts = slices(lengths, 2)
    assert [s.start for s in cuts] == [0, 7] and cuts[-1].stop == len(lengths)
    assert [sum(lengths[s]) for s in cuts] == [34, 41]
    assert slices([1, 1, 1, 100], 3) == [slice(0, 2), slice(2, 3), slice(3, 4)]
    assert slices([5, 5], 4) == [slice(0, 1), slice(1, 2)]


def test_auto_is_one_replica_per_thread_of_the_session() -> None:
    assert replica_count(0, 0) == min(physical_cores(), MAX_AUTO_REPLICAS) >= 1
    assert replica_count(0, 64) == MAX_AUTO_REPLICAS  # memory: not one per host core
    assert replica_count(0, 3) == 3
    assert replica_count(1, 0) == 1
    assert replica_count(4, 2) == 4


def test_a_big_batch_runs_in_slices_and_gives_what_one_session_gives(
    plain: Encoder, replicated: Encoder, slice_calls: list[list[int]]
) -> None:
    expected, stats = plain.encode(TEXTS)
    got, same_stats = replicated.encode(TEXTS)
    # Padding cuts the mixed lengths into batches; the big ones ran in two slices.
    assert slice_calls and all(len(c) == 2 and sum(c) >= MIN_REPLICA_ROWS for c in slice_calls)
    _same(got, expected)
    assert same_stats == stats


def test_small_batches_keep_the_multi_thread_session(
    plain: Encoder, replicated: Encoder, slice_calls: list[list[int]]
) -> None:
    small = TEXTS[: MIN_REPLICA_ROWS - 1]
    got, _ = replicated.encode(small)
    assert slice_calls == []
    _same(got, plain.encode(small)[0])


def test_branches_and_token_states_match_row_for_row(
    plain: Encoder, replicated: Encoder, slice_calls: list[list[int]]
) -> None:
    if plain.parts is None:
        pytest.skip("the repository is one graph: no branches")
    branches = {
        EMBEDDING: BranchRows(range(0, len(TEXTS), 2)),
        MULTITASK: BranchRows(range(len(TEXTS)), tokens=[1, 5, 20, 23]),
    }
    expected = plain.encode_full(TEXTS, branches=branches)
    got = replicated.encode_full(TEXTS, branches=branches)
    assert slice_calls
    for name in branches:
        _same(got.features(name).pooled, expected.features(name).pooled)
        want, have = expected.features(name).token_states, got.features(name).token_states
        assert sorted(have) == sorted(want)
        for row, states in want.items():
            _same(have[row], states)


def test_a_single_graph_encoder_runs_in_slices_too(model_repo: Path, spec: EncoderSpec) -> None:
    variants = {name: replace(v, parts={}) for name, v in spec.variants.items()}
    one_graph = replace(spec, parts={}, variants=variants)
    whole = Encoder(model_repo, one_graph, providers=CPU)
    encoder = Encoder(model_repo, one_graph, providers=CPU, replicas=2)
    try:
        assert encoder.parts is None and encoder.replicas is not None
        _same(encoder.encode(TEXTS)[0], whole.encode(TEXTS)[0])
        pairs = zip(encoder.encode_tokens(TEXTS), whole.encode_tokens(TEXTS), strict=True)
        for (have, encoding), (want, _) in pairs:
            assert len(have) == len(encoding.ids)
            _same(have, want)
    finally:
        encoder.close()


def test_new_branches_get_replicas_too(
    plain: Encoder, replicated: Encoder, spec: EncoderSpec, slice_calls: list[list[int]]
) -> None:
    if plain.parts is None:
        pytest.skip("the repository is one graph: no branches")
    served = replicated.with_branches(spec.with_branches({"mine": spec.branch_files(MULTITASK)}))
    assert served.replicas is not None and replicated.replicas is not None
    for copy, old in zip(served.replicas.copies, replicated.replicas.copies, strict=True):
        assert copy.parts is not None and old.parts is not None
        assert copy.main is old.main
        assert copy.parts.branches[EMBEDDING] is old.parts.branches[EMBEDDING]
        assert copy.parts.branches["mine"] is not old.parts.branches[MULTITASK]
    got, _ = served.encode(TEXTS, branch="mine")
    _same(got, plain.encode(TEXTS, branch=MULTITASK)[0])
