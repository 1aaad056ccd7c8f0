"""Forming encoder batches across tasks: token budget, row cap, wait, fairness.

`Scheduler` is plain synchronous state, owned by the worker's one batching coroutine.
Pulled jobs wait in one queue per head. A batch closes when any of these is reached:

    token budget   padded tokens (longest text x rows) would pass `max_batch_tokens`
    row cap        texts would pass `max_batch_rows`
    wait           `max_wait_ms` since the oldest waiting job arrived (default 0: the
                   worker cuts a batch as soon as its encoder is free)

Heads take turns filling a batch, each taking up to its weight in jobs per turn
(`task_weights`, default 1), and the head that goes first rotates: a flood of one head
fills the batch only with what the others leave, so no head starves. Jobs past their
deadline are taken out before they reach the encoder, and answered without it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from tokenizers import Encoding

from workers.consumer import Pulled


@dataclass(frozen=True)
class Item:
    """One pulled job waiting for a batch, with its size in encoder terms."""

    pulled: Pulled
    rows: int  # texts it adds to the encoder batch (before de-duplication)
    longest: int  # tokens of its longest text
    arrived_s: float  # monotonic time it was pulled
    alone: bool = False  # reclaimed after a failure: runs in a batch of its own
    encodings: tuple[Encoding, ...] = ()  # its texts, tokenized while sizing it

    @property
    def deadline_ms(self) -> int:
        """The job's absolute deadline (Unix ms)."""
        assert self.pulled.job is not None
        return self.pulled.job.deadline_ms

    @property
    def head(self) -> str:
        """The stream's head: jobs are queued per head."""
        assert self.pulled.job is not None
        return self.pulled.job.head


@dataclass(frozen=True)
class Batch:
    """What one `take` hands on: jobs for the encoder, and jobs already too late."""

    items: list[Item]
    expired: list[Item]


class Scheduler:
    """Per-head queues of pulled jobs and the rules that cut them into batches."""

    def __init__(
        self, *, max_tokens: int, max_rows: int, max_wait_s: float, weights: Mapping[str, int]
    ) -> None:
        self._max_tokens = max_tokens
        self._max_rows = max_rows
        self._max_wait_s = max_wait_s
        self._weights = dict(weights)
        self._queues: dict[str, deque[Item]] = {}
        self._turn = 0
        self._rows = 0
        self._longest = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def add(self, item: Item) -> None:
        """Queue a pulled job under its head."""
        self._queues.setdefault(item.head, deque()).append(item)
        self._rows += item.rows
        self._longest = max(self._longest, item.longest)

    def full(self) -> bool:
        """True when what waits already fills a batch."""
        return self._rows >= self._max_rows or self._rows * self._longest >= self._max_tokens

    def wait_left_s(self, now_s: float) -> float | None:
        """Seconds until the oldest job has waited `max_wait`; None when nothing waits."""
        oldest = min((q[0].arrived_s for q in self._queues.values() if q), default=None)
        return None if oldest is None else max(0.0, oldest + self._max_wait_s - now_s)

    def take(self, now_ms: int) -> Batch:
        """The next batch (at least one job when any waits), fairly across heads."""
        expired = self._drop_expired(now_ms)
        for queue in self._queues.values():
            alone = next((i for i in queue if i.alone), None)
            if alone is not None:
                # Retried work runs by itself: a poison job cannot fail healthy ones.
                queue.remove(alone)
                return self._close([alone], expired)
        heads = sorted(h for h, q in self._queues.items() if q)
        if not heads:
            return Batch([], expired)
        start = self._turn % len(heads)
        self._turn += 1
        order = heads[start:] + heads[:start]
        items: list[Item] = []
        rows = longest = 0
        progress = True
        while progress:
            progress = False
            for head in order:
                queue = self._queues[head]
                for _ in range(self._weights.get(head, 1)):
                    if not queue:
                        break
                    item = queue[0]
                    if item.alone:
                        break
                    width = max(longest, item.longest)
                    fits = rows + item.rows <= self._max_rows
                    fits = fits and (rows + item.rows) * width <= self._max_tokens
                    if items and not fits:
                        return self._close(items, expired)
                    items.append(queue.popleft())
                    rows, longest = rows + item.rows, width
                    progress = True
        return self._close(items, expired)

    def _close(self, items: list[Item], expired: list[Item]) -> Batch:
        self._recount()
        return Batch(items, expired)

    def _drop_expired(self, now_ms: int) -> list[Item]:
        expired = []
        for head, queue in self._queues.items():
            keep = deque(i for i in queue if i.deadline_ms > now_ms)
            expired += [i for i in queue if i.deadline_ms <= now_ms]
            self._queues[head] = keep
        self._recount()
        return expired

    def _recount(self) -> None:
        waiting = [i for q in self._queues.values() for i in q]
        self._rows = sum(i.rows for i in waiting)
        self._longest = max((i.longest for i in waiting), default=0)
