"""Fixtures of both folders: the built model repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
