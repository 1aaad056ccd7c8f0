"""The training schedule: every task's rows once per epoch, the topic rows `topic_passes`
times and the entities rows `entities_passes` times."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from taskmux_api.kinds import HeadKind

from taskmux.cli import main
from taskmux.modelrepo.build import source_model_dir
from taskmux.modelrepo.multitask import Recipe, schedule
from taskmux.modelrepo.multitask_data import Task, TaskRows, load_tokenizer


def _task(name: str, rows: int) -> Task:
    tokenizer = load_tokenizer(source_model_dir() / "tokenizer.json", 16)
    texts = [f"text number {k}" + " more" * (k % 5) for k in range(rows)]
    data = TaskRows(tokenizer.encode_batch(texts), [k % 2 for k in range(rows)], texts)
    return Task(name, HeadKind.CLASSIFICATION, ("a", "b"), data, data)


def _rows_seen(topic_passes: int, entities_passes: int = 1) -> dict[int, Counter[int]]:
    tasks = [_task("sentiment", 40), _task("topic", 24), _task("entities", 16)]
    recipe = Recipe(
        batch_size=8, window=2, topic_passes=topic_passes, entities_passes=entities_passes
    )
    seen: dict[int, Counter[int]] = {0: Counter(), 1: Counter(), 2: Counter()}
    for t, rows in schedule(tasks, recipe, np.random.default_rng(0)):
        seen[t].update(rows)
    return seen


def test_each_row_once_per_epoch_by_default() -> None:
    seen = _rows_seen(1)
    assert seen[0] == Counter(range(40)) and seen[1] == Counter(range(24))
    assert seen[2] == Counter(range(16))


def test_topic_rows_are_seen_topic_passes_times_and_the_others_once() -> None:
    seen = _rows_seen(2)
    assert seen[0] == Counter(range(40))
    assert seen[1] == Counter({k: 2 for k in range(24)})


def test_entities_rows_are_seen_entities_passes_times() -> None:
    seen = _rows_seen(1, entities_passes=3)
    assert seen[0] == Counter(range(40)) and seen[1] == Counter(range(24))
    assert seen[2] == Counter({k: 3 for k in range(16)})


def test_the_passes_flags_refuse_less_than_one_pass(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--topic-passes", "--entities-passes"):
        for bad in ("0", "-1", "two"):
            with pytest.raises(SystemExit):
                main(["model", "train-multitask", flag, bad, "--tiny"])
            assert "is not a number of passes: give 1 or more" in capsys.readouterr().err


def test_the_training_command_trains_the_committed_recipe_unless_told_otherwise() -> None:
    from taskmux.cli import _parser
    from taskmux.modelcli import multitask_recipe

    default = multitask_recipe(_parser().parse_args(["model", "train-multitask"]))
    assert (default.topic_passes, default.entities_passes, default.ema) == (
        Recipe.topic_passes, Recipe.entities_passes, Recipe.ema,
    )  # fmt: skip
    assert Recipe.ema > 0 and Recipe.topic_passes > 1  # the committed branch's recipe
    argv = ["model", "train-multitask", "--topic-passes", "1", "--entities-passes", "1"]
    given = multitask_recipe(_parser().parse_args([*argv, "--ema", "0"]))
    assert (given.topic_passes, given.entities_passes, given.ema) == (1, 1, 0.0)
