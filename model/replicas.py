"""Data parallelism inside one worker: single-thread copies of the encoder's graphs.

On a CPU, one session with N intra-op threads splits every operator N ways and meets at a
barrier after each one; a batch of short texts spends much of its time at those barriers,
worse when the gateway and Redis take a core for a moment. N sessions of one thread each,
every one running a contiguous slice of the batch, never wait on each other
(a one-off in-process measurement on a 2-core machine, 2026-12-05: batch 32, 919 texts/s
on one 2-thread session, 1033 on two 1-thread copies; `bench/ab.py` measures the worker).
Each copy holds its own weights, so memory grows by one copy of the encoder per replica
(README, `TASKMUX_ENCODER_REPLICAS`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

import numpy as np

from model.parts import Graphs

T = TypeVar("T")
R = TypeVar("R")

# Fewer rows than this run on the multi-thread session: a slice of a small batch on one
# thread takes longer than the whole batch on all of them, which a lone caller would feel.
MIN_REPLICA_ROWS = 8
# Most replicas `auto` opens: each is another copy of the weights (about 138 MiB for the
# split fp32 encoder), so a worker on a large host must not open one per host core.
MAX_AUTO_REPLICAS = 4

_CPUS = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


class Replicas:
    """Copies of the encoder's graphs, one intra-op thread each, and the threads that run
    them at once. `close` stops the threads; copies made by `with_copies` share them."""

    def __init__(self, copies: Sequence[Graphs], pool: ThreadPoolExecutor | None = None) -> None:
        if len(copies) < 2:
            raise ValueError("data parallelism needs at least 2 replicas")
        self.copies = list(copies)
        # The calling thread runs the first slice itself, so one thread fewer than copies.
        self._pool = pool or ThreadPoolExecutor(
            len(copies) - 1, thread_name_prefix="encoder-replica"
        )

    def with_copies(self, copies: Sequence[Graphs]) -> Replicas:
        """The same threads running other copies (new branches of the same encoder)."""
        return Replicas(copies, self._pool)

    def map(self, fn: Callable[[Graphs, T], R], items: Sequence[T]) -> list[R]:
        """`fn(copy, item)` for each item on its own copy, all at once, results in order."""
        if not 0 < len(items) <= len(self.copies):
            raise ValueError(f"{len(items)} slices for {len(self.copies)} replicas")
        pairs = list(zip(self.copies, items, strict=False))
        futures = [self._pool.submit(fn, copy, item) for copy, item in pairs[1:]]
        first = fn(*pairs[0])
        return [first, *(f.result() for f in futures)]

    def close(self) -> None:
        """Let the threads end once the slices they run are done (without waiting for
        them: a batch left running at shutdown is abandoned); `map` fails afterwards."""
        self._pool.shutdown(wait=False)


def slices(lengths: Sequence[int], parts: int) -> list[slice]:
    """Cut rows sorted by length into at most `parts` contiguous non-empty slices of about
    equal tokens (the later slices, of longer texts, get fewer rows)."""
    parts = min(parts, len(lengths))
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    targets = cumulative[-1] * np.arange(1, parts) / parts
    # The row boundary whose token count before it is nearest each target.
    above = np.searchsorted(cumulative, targets, side="left")
    nearer_below = targets - cumulative[above - 1] <= cumulative[above] - targets
    cuts = np.where(nearer_below, above - 1, above)
    # Each slice keeps at least one row whatever the lengths.
    bounds = [0]
    for k, cut in enumerate(cuts.tolist()):
        bounds.append(min(max(cut, bounds[-1] + 1), len(lengths) - (parts - 1 - k)))
    bounds.append(len(lengths))
    return [slice(a, b) for a, b in pairwise(bounds)]


def replica_count(requested: int, intra_op_threads: int) -> int:
    """Replicas for a CPU session: `requested`, or with 0 (auto) as many as the session's
    threads (`intra_op_threads`, or ONNX Runtime's default when that is 0, one per physical
    core this process may run on, within its cgroup's CPU quota), at most
    MAX_AUTO_REPLICAS."""
    if requested:
        return requested
    return min(intra_op_threads or physical_cores(), MAX_AUTO_REPLICAS)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = _CPUS / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return min(len(cores), _cgroup_cpus() or len(cores))


def _cgroup_cpus() -> int:
    """Whole CPUs the cgroup v2 quota allows (a pod's CPU limit), 0 when unlimited or
    unknown: affinity alone shows every host core to a limited container."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return 0
    if quota == "max":
        return 0
    return max(1, -(-int(quota) // int(period)))
