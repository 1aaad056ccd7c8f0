"""The training schedule: every task's rows once per epoch, the topic rows `topic_passes`
times."""

from __future__ import annotations

from collections import Counter

import numpy as np
from taskmux_api.kinds import HeadKind

from taskmux.modelrepo.build import source_model_dir
from taskmux.modelrepo.multitask import Recipe, schedule
from taskmux.modelrepo.multitask_data import Task, TaskRows, load_tokenizer


def _task(name: str, rows: int) -> Task:
    tokenizer = load_tokenizer(source_model_dir() / "tokenizer.json", 16)
    texts = [f"text number {k}" + " more" * (k % 5) for k in range(rows)]
    data = TaskRows(tokenizer.encode_batch(texts), [k % 2 for k in range(rows)], texts)
    return Task(name, HeadKind.CLASSIFICATION, ("a", "b"), data, data)


def _rows_seen(topic_passes: int) -> dict[int, Counter[int]]:
    tasks = [_task("sentiment", 40), _task("topic", 24)]
    recipe = Recipe(batch_size=8, window=2, topic_passes=topic_passes)
    seen: dict[int, Counter[int]] = {0: Counter(), 1: Counter()}
    for t, rows in schedule(tasks, recipe, np.random.default_rng(0)):
        seen[t].update(rows)
    return seen


def test_each_row_once_per_epoch_by_default() -> None:
    seen = _rows_seen(1)
    assert seen[0] == Counter(range(40)) and seen[1] == Counter(range(24))


def test_topic_rows_are_seen_topic_passes_times_and_the_others_once() -> None:
    seen = _rows_seen(2)
    assert seen[0] == Counter(range(40))
    assert seen[1] == Counter({k: 2 for k in range(24)})
