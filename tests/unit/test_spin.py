"""Spinning within a run, chosen by timing: the chooser's rule, and the real encoder
opening its multi-thread session both ways and giving the same vectors either way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model.encoder import BranchRows, Encoder, l2_normalize
from model.manifest import EMBEDDING, MULTITASK, EncoderSpec, load_manifest
from model.spin import EXPLORE_EVERY, MIN_SAMPLES, WINDOW, SpinChooser, SpinInRun

CPU = ["CPUExecutionProvider"]
SMALL = 16 * 4  # padded tokens of a small batch
BIG = 16 * 64


def _feed(
    chooser: SpinChooser, padded: int, spin_s: float, sleep_s: float, runs: int
) -> list[bool]:
    """Let the chooser pick `runs` times, each run taking the time its way takes."""
    picks = []
    for _ in range(runs):
        spin = chooser.spin(padded)
        chooser.record(padded, spin, spin_s if spin else sleep_s)
        picks.append(spin)
    return picks


def test_both_ways_are_timed_before_either_is_chosen() -> None:
    picks = _feed(SpinChooser(), SMALL, spin_s=0.001, sleep_s=0.002, runs=2 * MIN_SAMPLES)
    assert sorted(picks) == [False] * MIN_SAMPLES + [True] * MIN_SAMPLES


def test_the_faster_way_runs_and_the_other_is_tried_now_and_then() -> None:
    chooser = SpinChooser()
    _feed(chooser, SMALL, spin_s=0.001, sleep_s=0.002, runs=2 * MIN_SAMPLES)
    picks = _feed(chooser, SMALL, spin_s=0.001, sleep_s=0.002, runs=4 * EXPLORE_EVERY)
    assert picks.count(False) == 4  # one in EXPLORE_EVERY, to keep its times current
    chooser = SpinChooser()
    _feed(chooser, SMALL, spin_s=0.003, sleep_s=0.002, runs=2 * MIN_SAMPLES)
    assert (
        _feed(chooser, SMALL, spin_s=0.003, sleep_s=0.002, runs=4 * EXPLORE_EVERY).count(True) == 4
    )


def test_a_change_on_the_machine_turns_the_choice() -> None:
    """Quiet, spinning wins; then another process takes a core and spinning slows down."""
    chooser = SpinChooser()
    quiet = _feed(chooser, SMALL, spin_s=0.001, sleep_s=0.002, runs=3 * EXPLORE_EVERY)
    assert quiet[-EXPLORE_EVERY:].count(True) == EXPLORE_EVERY - 1
    busy = _feed(chooser, SMALL, spin_s=0.004, sleep_s=0.003, runs=WINDOW * EXPLORE_EVERY)
    # Within WINDOW spinning runs its window is all slow ones; after that only exploring.
    settled = busy[WINDOW:]
    assert settled.count(True) <= len(settled) // EXPLORE_EVERY + 1


def test_sizes_are_compared_apart() -> None:
    """Big batches timed only sleeping say nothing about small ones."""
    chooser = SpinChooser()
    for _ in range(WINDOW):
        chooser.record(BIG, False, 0.050)
    assert _feed(chooser, SMALL, spin_s=0.001, sleep_s=0.002, runs=2)[0] is False  # fill first
    _feed(chooser, SMALL, spin_s=0.001, sleep_s=0.002, runs=2 * MIN_SAMPLES)
    assert chooser.spin(SMALL + 1)  # the same size class
    assert chooser.spin(BIG)  # no spinning runs of that size yet: timed that way next


@pytest.fixture(scope="module")
def spec(model_repo: Path) -> EncoderSpec:
    return load_manifest(model_repo).encoder


@pytest.fixture(scope="module")
def chosen(model_repo: Path, spec: EncoderSpec) -> Iterator[Encoder]:
    encoder = Encoder(model_repo, spec, providers=CPU, intra_op_threads=2, spin_in_run="auto")
    yield encoder
    encoder.close()


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert (l2_normalize(a) * l2_normalize(b)).sum(axis=1).min() >= 0.99999


def test_the_encoder_runs_small_batches_both_ways_with_the_same_vectors(
    model_repo: Path, spec: EncoderSpec, chosen: Encoder
) -> None:
    plain = Encoder(model_repo, spec, providers=CPU, intra_op_threads=2)
    texts = ["the market rose after strong earnings", "a short one"]
    expected = plain.encode(texts)[0]
    assert chosen._chooser is not None and chosen._spinning is not None
    spun_before = _runs(chosen._chooser, spin=True)
    for _ in range(2 * MIN_SAMPLES + 2):
        _same(chosen.encode_full(texts, alone=True).pooled, expected)
    assert _runs(chosen._chooser, spin=True) > spun_before
    assert _runs(chosen._chooser, spin=False) >= MIN_SAMPLES


def test_batches_not_run_alone_never_spin(chosen: Encoder) -> None:
    """Under load the cores a spinning thread would take belong to the gateway and Redis."""
    assert chosen._chooser is not None
    before = {key: list(times) for key, times in chosen._chooser._times.items()}
    chosen.encode(["not alone", "nor this"])
    after = {key: list(times) for key, times in chosen._chooser._times.items()}
    assert after == before


def test_new_branches_are_opened_spinning_too(chosen: Encoder, spec: EncoderSpec) -> None:
    if chosen.parts is None:
        pytest.skip("the repository is one graph: no branches")
    served = chosen.with_branches(spec.with_branches({"mine": spec.branch_files(MULTITASK)}))
    assert served._spinning is not None and chosen._spinning is not None
    assert served._spinning.parts is not None and chosen._spinning.parts is not None
    assert served._spinning.main is chosen._spinning.main
    kept = served._spinning.parts.branches[EMBEDDING]
    assert kept is chosen._spinning.parts.branches[EMBEDDING]
    texts = ["one text", "and another"]
    rows = BranchRows(range(len(texts)))
    for _ in range(2 * MIN_SAMPLES + 2):
        have = served.encode_full(texts, branches={"mine": rows}, alone=True)
        want = chosen.encode_full(texts, branches={MULTITASK: rows}, alone=True)
        _same(have.features("mine").pooled, want.features(MULTITASK).pooled)


FIXED: tuple[SpinInRun, ...] = ("off", "on")


@pytest.mark.parametrize("setting", FIXED)
def test_off_and_on_open_one_multi_thread_session(
    model_repo: Path, spec: EncoderSpec, setting: SpinInRun
) -> None:
    encoder = Encoder(model_repo, spec, providers=CPU, intra_op_threads=2, spin_in_run=setting)
    assert encoder._chooser is None and encoder._spinning is None


def test_one_thread_leaves_nothing_to_choose(model_repo: Path, spec: EncoderSpec) -> None:
    encoder = Encoder(model_repo, spec, providers=CPU, intra_op_threads=1, spin_in_run="auto")
    assert encoder._chooser is None and encoder._spinning is None


def _runs(chooser: SpinChooser, *, spin: bool) -> int:
    return sum(len(times) for (_, way), times in chooser._times.items() if way == spin)
