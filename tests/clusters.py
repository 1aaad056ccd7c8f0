"""The one way integration tests start clusters, and the reset between tests that share one.

`ClusterFactory` starts, in order: Valkey, optionally the catalog a worker would leave
(so gateways serve while no worker runs), the workers, then the gateways, and waits until
every gateway answers SERVING (or lists the model's heads). The fixtures of
tests/integration/conftest.py hand it out: `make_cluster` per test, `make_shared_cluster`
per module.

A shared cluster keeps its processes between tests, so `reset_keyspace` clears what calls
leave behind before each test. FLUSHALL would do too much: it drops the consumer groups
(workers recreate them only at their next read), the gateways' reply streams (a worker's
reply to a stream that is gone is dropped until the gateway's next keep-alive) and the
catalogs (gateways would turn calls away until the workers' next refresh). The reset keeps
those, and what a module's set-up wrote outside taskmux's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import redis

from model.manifest import load_manifest
from router import keys
from tests.harness import Cluster, serving, wait_for_catalog, wait_until

# Settings of one process, as `Cluster.start_worker`/`start_gateway` take them.
Env = Mapping[str, str]
Ready = Literal["serving", "catalog"]

# Keys that only calls write (idempotency records, tenant limits, dead letters): deleted.
PER_CALL_PREFIXES = (f"{keys.PREFIX}idem:", f"{keys.PREFIX}limit:")
PER_CALL_STREAM = keys.DEAD_LETTER_STREAM
JOB_STREAMS = keys.task_stream("")
SCAN_COUNT = 1000
GATEWAY_READY_S = 30
CATALOG_READY_S = 60


class ClusterFactory:
    """Starts clusters with options; `close` stops every one it started."""

    def __init__(self, model_repo: Path, workdir: Callable[[], Path]) -> None:
        self._model_repo = model_repo
        self._workdir = workdir  # a fresh folder per cluster
        self.started: list[Cluster] = []
        self.to_reset: list[Cluster] = []

    def __call__(
        self,
        *,
        workers: int | Sequence[Env] | None = None,
        gateways: int | Sequence[Env] = 0,
        catalog: bool = False,
        redis_args: Sequence[str] = (),
        start_redis: bool = True,
        ready: Ready = "serving",
        model_repo: Path | None = None,
        reset: bool = True,
    ) -> Cluster:
        """A started cluster. `workers` (default 1) and `gateways`: how many, or one
        settings mapping each. `start_redis=False` starts nothing: the test does.
        `reset=False` keeps a shared cluster's keyspace between tests, for a module whose
        tests read what its set-up left."""
        if workers is None:
            workers = 1 if start_redis else 0
        worker_envs, gateway_envs = _envs(workers), _envs(gateways)
        if not start_redis and (worker_envs or gateway_envs or catalog):
            raise ValueError("workers, gateways and a catalog need start_redis=True")
        cluster = Cluster(model_repo or self._model_repo, self._workdir())
        self.started.append(cluster)
        if reset:
            self.to_reset.append(cluster)
        if start_redis:
            cluster.start_redis(args=redis_args)
        if catalog:
            seed_catalog(cluster)
        for env in worker_envs:
            cluster.start_worker(**env)
        addresses = [cluster.start_gateway(**env)[1] for env in gateway_envs]
        for address in addresses:  # started together, so they start up side by side
            _wait_ready(cluster, address, ready)
        return cluster

    def reset(self) -> None:
        """Clear the per-call keys of every cluster started with `reset=True`."""
        for cluster in self.to_reset:
            reset_keyspace(cluster.redis_url)

    def close(self) -> None:
        for cluster in reversed(self.started):
            cluster.stop_all()


def seed_catalog(cluster: Cluster) -> None:
    """Write the catalog a worker would leave: gateways then serve with no worker running."""
    catalog = load_manifest(cluster.model_repo, verify=False).to_json(with_checksums=False)
    with redis.Redis.from_url(cluster.redis_url) as r:
        r.set(keys.CATALOG_KEY, catalog)


def reset_keyspace(redis_url: str) -> None:
    """Empty the job streams (their consumer group stays, with nothing pending) and delete
    the keys calls leave. Catalogs, the worker registry, reply streams, worker counters and
    keys outside taskmux's prefix stay: the processes and the module's set-up own them."""
    with redis.Redis.from_url(redis_url) as r:
        # One pass, big pages: a module's set-up may fill the keyspace (test_registry).
        found = [k.decode() for k in r.scan_iter(match=f"{keys.PREFIX}*", count=SCAN_COUNT)]
        for stream in (k for k in found if k.startswith(JOB_STREAMS)):
            r.xtrim(stream, maxlen=0, approximate=False)
            _forget_pending(r, stream)
        doomed = [k for k in found if k.startswith(PER_CALL_PREFIXES) or k == PER_CALL_STREAM]
        if doomed:
            r.delete(*doomed)


def _forget_pending(r: redis.Redis, stream: str) -> None:
    groups = {g["name"] for g in r.xinfo_groups(stream)}
    if keys.WORKER_GROUP.encode() not in groups:
        return
    while pending := r.xpending_range(stream, keys.WORKER_GROUP, "-", "+", 1000):
        r.xack(stream, keys.WORKER_GROUP, *(p["message_id"] for p in pending))


def _envs(spec: int | Sequence[Env]) -> list[Env]:
    return [{}] * spec if isinstance(spec, int) else list(spec)


def _wait_ready(cluster: Cluster, address: str, ready: Ready) -> None:
    wait_until(lambda: serving(address), GATEWAY_READY_S, f"gateway {address} SERVING")
    if ready == "catalog":
        wait_for_catalog(address, cluster.model_repo, CATALOG_READY_S)
