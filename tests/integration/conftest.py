"""Integration fixtures: clusters from one factory, and a clean keyspace per test.

Every test in this folder is marked `integration`, so `-m "not integration"` runs
tests/unit alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.clusters import ClusterFactory
from tests.harness import Cluster

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def make_cluster(model_repo: Path, tmp_path: Path) -> Iterator[ClusterFactory]:
    """Clusters of one test, stopped after it: for tests that kill or restart things."""
    count = iter(range(1_000))
    factory = ClusterFactory(model_repo, lambda: _folder(tmp_path / f"cluster-{next(count)}"))
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def make_shared_cluster(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ClusterFactory]:
    """Clusters shared by the tests of one module; `clean_keyspace` resets them per test."""
    factory = ClusterFactory(model_repo, lambda: tmp_path_factory.mktemp(request.module.__name__))
    yield factory
    factory.close()


@pytest.fixture(autouse=True)
def clean_keyspace(request: pytest.FixtureRequest) -> None:
    """Before each test, clear what earlier tests' calls left in the module's shared
    clusters (a module that starts none pays nothing)."""
    if "make_shared_cluster" in request.fixturenames:
        factory: ClusterFactory = request.getfixturevalue("make_shared_cluster")
        factory.reset()


@pytest.fixture(scope="module")
def cluster(make_shared_cluster: ClusterFactory) -> Cluster:
    """Valkey and one worker, shared by the tests of one module; each module starts the
    gateways it needs. A module that needs another set-up defines its own `cluster`."""
    return make_shared_cluster()


@pytest.fixture(scope="module")
def valkey_url(make_shared_cluster: ClusterFactory) -> str:
    """A Valkey alone, shared by the module, for components run in the test's event loop."""
    return make_shared_cluster(workers=0).redis_url


@pytest.fixture
async def aredis(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of `valkey_url`, in the test's event loop."""
    client = aioredis.Redis.from_url(valkey_url)
    yield client
    await client.aclose()


def _folder(path: Path) -> Path:
    path.mkdir()
    return path
