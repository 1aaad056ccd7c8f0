"""The worker registry (router/registry.py) and the gateway's periodic Redis work: it finds
live workers without scanning the keyspace, drops dead ones, and keeps its reply stream
alive on a clock of its own."""

from __future__ import annotations

import pytest
import redis

from router import keys
from tests.clusters import ClusterFactory
from tests.harness import Cluster, listed_heads, serving, wait_for_catalog, wait_until

pytestmark = pytest.mark.integration

UNRELATED_KEYS = 20_000
GATEWAY_ID = "gw-registry"
WORKER_ID = "worker-live"


@pytest.fixture(scope="module")
def cluster(make_shared_cluster: ClusterFactory) -> Cluster:
    """Valkey holding 20,000 keys that are not taskmux's (the clean keyspace leaves them),
    one worker, one gateway that checks the catalog ten times a second."""
    c = make_shared_cluster(
        workers=[{"worker_id": WORKER_ID, "reload_interval_ms": "0"}],
        gateways=[{"gateway_id": GATEWAY_ID, "monitor_interval_ms": "100"}],
        ready="catalog",
    )
    with redis.Redis.from_url(c.redis_url) as r:
        for start in range(0, UNRELATED_KEYS, 1000):
            r.mset({f"other-app:{i}": "x" for i in range(start, start + 1000)})
    return c


@pytest.fixture
def admin(cluster: Cluster) -> redis.Redis:
    return redis.Redis.from_url(cluster.redis_url, decode_responses=True)


def _address(cluster: Cluster) -> str:
    return next(p.address for p in cluster.procs if p.name == "gateway")


def _calls(admin: redis.Redis, command: str) -> int:
    stats = admin.info("commandstats").get(f"cmdstat_{command}") or {}
    return int(stats.get("calls", 0))


def _members(admin: redis.Redis) -> set[str]:
    return set(admin.smembers(keys.WORKERS_KEY))  # type: ignore[arg-type]


def test_the_gateway_finds_workers_without_scanning(cluster: Cluster, admin: redis.Redis) -> None:
    assert admin.dbsize() > UNRELATED_KEYS
    admin.config_resetstat()
    # Twenty rounds of the catalog check, however long they take.
    wait_until(lambda: _calls(admin, "smembers") >= 20, 60, "twenty catalog checks")
    assert _calls(admin, "scan") == 0
    assert _members(admin) == {WORKER_ID}
    wait_for_catalog(_address(cluster), cluster.model_repo)


def test_dead_workers_leave_the_registry(cluster: Cluster, admin: redis.Redis) -> None:
    # An id whose catalog key is gone, as a worker killed long ago leaves it.
    admin.sadd(keys.WORKERS_KEY, "ghost")
    wait_until(lambda: "ghost" not in _members(admin), 30, "the ghost removed")
    doomed = cluster.start_worker(worker_id="doomed", catalog_refresh_s="1", reload_interval_ms="0")
    wait_until(lambda: "doomed" in _members(admin), 120, "the second worker registered")
    doomed.popen.kill()  # SIGKILL: no chance to withdraw
    doomed.popen.wait()
    assert "doomed" in _members(admin)
    # Its key (TTL 3 x 1 s) expires, then a gateway round removes the id.
    wait_until(lambda: "doomed" not in _members(admin), 60, "the killed worker removed")
    assert not admin.exists(keys.worker_catalog("doomed"))
    assert _members(admin) == {WORKER_ID}
    assert listed_heads(_address(cluster))


def test_the_reply_stream_ttl_is_refreshed_even_while_the_catalog_read_fails(
    cluster: Cluster, admin: redis.Redis
) -> None:
    stream = keys.reply_stream(GATEWAY_ID)
    ttl_s = 60  # the gateway's default reply_ttl_s
    wait_until(lambda: admin.ttl(stream) > ttl_s - 10, 30, "a fresh reply stream TTL")
    # A registry of the wrong type fails every catalog read (the gateway reports
    # NOT_SERVING); the reply stream's own loop must go on regardless.
    admin.delete(keys.WORKERS_KEY)
    admin.set(keys.WORKERS_KEY, "not a set")
    address = _address(cluster)
    wait_until(lambda: not serving(address), 30, "catalog reads failing")
    try:
        for _ in range(2):
            admin.expire(stream, 20)
            wait_until(lambda: admin.ttl(stream) > 30, 30, "the reply stream's TTL refreshed")
    finally:
        admin.delete(keys.WORKERS_KEY)
    wait_until(lambda: serving(address), 30, "gateway SERVING again")
    # The worker registers again at its next refresh.
    wait_until(lambda: _members(admin) == {WORKER_ID}, 60, "the worker registered again")
