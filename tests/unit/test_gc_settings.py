"""Gateways and workers start serving with start-up's objects frozen out of the garbage
collector and a larger young generation (taskmux/lifecycle.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from taskmux.lifecycle import GC_YOUNG_THRESHOLD, settle_garbage_collector


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_young_collections_are_rarer() -> None:
    gc.unfreeze()
    older = gc.get_threshold()[1:]
    settle_garbage_collector()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *older)
    assert GC_YOUNG_THRESHOLD > 700  # above Python's default, or the change does nothing


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_while_serving_are_still_collected_on_their_own() -> None:
    """No explicit gc.collect(): allocations past the new threshold must trigger one."""
    settle_garbage_collector()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None  # a cycle: reference counting alone cannot free it
    kept = [[] for _ in range(2 * GC_YOUNG_THRESHOLD)]  # tracked allocations, kept alive
    assert gone() is None
    assert len(kept) == 2 * GC_YOUNG_THRESHOLD
