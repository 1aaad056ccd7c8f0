"""The work a worker holds: entries pulled from the job streams and not yet finished.

A held entry is pending under this worker's name in the consumer group, so no other
worker can take it until it is acknowledged or this worker dies. Holding is therefore
bounded: the pull loop asks for more only while `room()` is left, and a job's texts
count against the bound from the moment it is pulled until its reply is written (or it
is dead-lettered). The default bound is one batch's worth of texts
(`TASKMUX_PREFETCH_BATCHES` x `TASKMUX_MAX_BATCH_ROWS`): the batch the encoder runs plus
the next one forming behind it, and no more, so a backlog stays in the streams where
every worker (and KEDA's lag trigger) sees it.

`HeldWork` is plain state on the event loop; only `wait_for_room` awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from workers.consumer import Pulled

# Until a pull has shown the real size of jobs, assume this many texts per job.
FIRST_TEXTS_PER_JOB = 8.0
# Weight of the newest pull in the running mean of texts per job.
MEAN_WEIGHT = 0.2


class HeldWork:
    """Entries this worker holds, per stream, and the texts they count against its bound."""

    def __init__(self, max_texts: int) -> None:
        self.max_texts = max_texts
        self.texts = 0
        self._entries: dict[str, dict[bytes, int]] = {}  # stream -> entry id -> texts
        self._texts_per_job = FIRST_TEXTS_PER_JOB
        self._freed = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._entries.values())

    def room(self) -> int:
        """Texts that may still be pulled."""
        return max(0, self.max_texts - self.texts)

    def jobs_to_ask(self, streams: int, cap: int) -> int:
        """How many entries to ask each of `streams` streams for (XREADGROUP's COUNT applies
        per stream), so that a full answer stays within the room left; at least 1."""
        jobs = int(self.room() / self._texts_per_job)
        return max(1, min(cap, jobs // max(1, streams)))

    async def wait_for_room(self) -> None:
        """Return once fewer texts are held than the bound."""
        while self.texts >= self.max_texts:
            self._freed.clear()
            await self._freed.wait()

    def hold(self, pulled: Iterable[Pulled]) -> None:
        """Count entries just pulled or reclaimed (undecodable ones count one text)."""
        jobs = texts = 0
        for p in pulled:
            size = len(p.job.texts) if p.job is not None else 1
            ids = self._entries.setdefault(p.stream, {})
            if p.entry_id not in ids:
                ids[p.entry_id] = size
                self.texts += size
            jobs, texts = jobs + 1, texts + size
        if jobs:
            mean = texts / jobs
            self._texts_per_job += MEAN_WEIGHT * (mean - self._texts_per_job)

    def release(self, pulled: Iterable[Pulled]) -> None:
        """Entries finished (acknowledged), or given up to be reclaimed by others."""
        for p in pulled:
            self.texts -= self._entries.get(p.stream, {}).pop(p.entry_id, 0)
        self._freed.set()

    def by_stream(self) -> dict[str, list[bytes]]:
        """Held entry ids per stream, for refreshing their idle time."""
        return {stream: list(ids) for stream, ids in self._entries.items() if ids}
