"""Shared fixtures: the built model repository, and a Valkey with one worker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_repo() -> Path:
    """The model repository built by `make model` (TASKMUX_TEST_MODEL_REPO overrides)."""
    repo = Path(os.environ.get("TASKMUX_TEST_MODEL_REPO", ROOT / "model-repo"))
    if not repo.is_absolute():
        repo = ROOT / repo
    if not (repo / "manifest.json").is_file():
        pytest.fail(f"no model repository at {repo}: run `make model` first")
    return repo


@pytest.fixture(scope="module")
def cluster(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """Valkey and one worker, shared by the tests of one module; each module starts the
    gateways it needs. A module that needs another set-up defines its own `cluster`."""
    with Cluster(model_repo, tmp_path_factory.mktemp(request.module.__name__)) as c:
        c.start_redis()
        c.start_worker()
        yield c
