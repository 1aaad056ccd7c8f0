"""Unit tests start no process and open no socket; the `integration` marker belongs to
tests/integration, where its conftest applies it to every test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    misplaced = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(HERE) and item.get_closest_marker("integration")
    ]
    if misplaced:
        raise pytest.UsageError(f"integration tests under tests/unit: {misplaced}")


def taskmux_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`taskmux ARGS` run as a user would, its output captured."""
    cmd = [sys.executable, "-m", "taskmux.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def repo(model_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the model repository (big files hard-linked, never written)."""
    copy = tmp_path / "repo"
    shutil.copytree(model_repo, copy, copy_function=os.link)
    return copy
