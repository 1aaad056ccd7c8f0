"""Unit tests start no process and open no socket; the `integration` marker belongs to
tests/integration, where its conftest applies it to every test."""

from __future__ import annotations

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
