"""`taskmux model train-multitask` runs end to end: a few steps on a few rows (the smoke
the CI can afford; the committed branch was trained by the full recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.manifest import MULTITASK
from taskmux.modelrepo.multitask import Recipe, train_multitask
from taskmux.modelrepo.multitask_data import TINY
from taskmux.modelrepo.multitask_store import BRANCH_FILE, BRANCH_META, multitask_heads
from tests.harness import SHARED_DATA as DATA


@pytest.mark.timeout(240)
def test_tiny_training_writes_a_branch_and_its_heads(tmp_path: Path) -> None:
    if not DATA.is_dir():
        pytest.fail(f"no shared data at {DATA}")
    lines: list[str] = []
    report = train_multitask(
        DATA, out_dir=tmp_path, recipe=Recipe(epochs=1, log_every=2), sizes=TINY, emit=lines.append,
        score_heldout=False,
    )  # fmt: skip
    assert any(line.startswith("step ") and " eta " in line for line in lines)
    assert any(line.startswith("validation intent:") for line in lines)
    meta = json.loads((tmp_path / BRANCH_META).read_text())
    assert meta["branch_layer"] == 2 and meta["epoch_kept"] == 1
    with np.load(tmp_path / BRANCH_FILE) as branch:
        assert {branch[k].dtype for k in branch.files} == {np.dtype(np.float16)}
        assert any(k.startswith("layers.layer.3.") for k in branch.files)  # layers 2 to 5
    heads = {spec.name: spec for spec, _ in multitask_heads(tmp_path)}
    assert sorted(heads) == ["entities", "intent", "sentiment", "topic"]
    assert {h.features for h in heads.values()} == {MULTITASK}
    assert heads["intent"].fallback_label == "oos"
    assert report["branch_bytes"] > 0


@pytest.mark.timeout(240)
def test_written_epoch_choice_keeps_the_epoch_whose_written_heads_validate_best(
    tmp_path: Path,
) -> None:
    if not DATA.is_dir():
        pytest.fail(f"no shared data at {DATA}")
    lines: list[str] = []
    recipe = Recipe(epochs=2, log_every=2, epoch_choice="written")
    train_multitask(DATA, out_dir=tmp_path, recipe=recipe, sizes=TINY, emit=lines.append,
                    score_heldout=False)  # fmt: skip
    marker = "mean validation score of the written heads "
    scores = [float(line.split(marker)[1]) for line in lines if marker in line]
    assert len(scores) == 2  # every epoch's written heads were scored
    meta = json.loads((tmp_path / BRANCH_META).read_text())
    assert meta["epoch_kept"] == 1 + scores.index(max(scores))
    assert meta["recipe"]["epoch_choice"] == "written"
