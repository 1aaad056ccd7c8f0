"""taskmux.backoff: the one exponential backoff of the server code."""

from __future__ import annotations

import pytest

from taskmux.backoff import Backoff


def test_waits_grow_by_the_multiplier_to_the_cap_and_reset() -> None:
    backoff = Backoff(0.1, 0.5)
    assert not backoff.retrying
    assert [backoff.next_s() for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert backoff.retrying
    backoff.reset()
    assert not backoff.retrying
    assert backoff.next_s() == 0.1
    triple = Backoff(1, 10, multiplier=3)
    assert [triple.next_s() for _ in range(4)] == [1, 3, 9, 10]


def test_jitter_shortens_each_wait_by_at_most_its_share() -> None:
    backoff = Backoff(1, 1, jitter=0.25)
    waits = [backoff.next_s() for _ in range(200)]
    assert all(0.75 <= w <= 1 for w in waits)
    assert len(set(waits)) > 1


@pytest.mark.parametrize(
    ("initial_s", "max_s", "multiplier", "jitter"),
    [(0, 1, 2, 0), (2, 1, 2, 0), (1, 2, 0.5, 0), (1, 2, 2, 1.5)],
)
def test_nonsense_is_refused(
    initial_s: float, max_s: float, multiplier: float, jitter: float
) -> None:
    with pytest.raises(ValueError):
        Backoff(initial_s, max_s, multiplier=multiplier, jitter=jitter)
