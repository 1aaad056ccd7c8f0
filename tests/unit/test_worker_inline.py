"""Which batches the worker computes on its event loop: small ones that are all it holds."""

from __future__ import annotations

from workers.batcher import Item
from workers.consumer import Pulled
from workers.worker import INLINE_COMPUTE_TOKENS, computes_inline


def _item(rows: int, longest: int) -> Item:
    return Item(Pulled("taskmux:v1:tasks:embed", b"1-0", None), rows, longest, 0.0)


def test_a_lone_short_job_is_computed_inline() -> None:
    assert computes_inline([_item(1, 16)], held_jobs=1)
    assert computes_inline([_item(1, INLINE_COMPUTE_TOKENS)], held_jobs=1)


def test_a_batch_over_the_token_bound_goes_to_a_thread() -> None:
    assert not computes_inline([_item(1, INLINE_COMPUTE_TOKENS + 1)], held_jobs=1)
    rows = INLINE_COMPUTE_TOKENS // 16 + 1  # padded: rows x the longest text
    assert not computes_inline([_item(1, 16) for _ in range(rows)], held_jobs=rows)


def test_other_held_work_sends_it_to_a_thread() -> None:
    assert not computes_inline([_item(1, 16)], held_jobs=2)
