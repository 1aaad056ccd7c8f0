"""The Grafana dashboard only queries metrics the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("gateway/metrics.py", "workers/metrics.py", "taskmux/metrics.py")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def exported() -> set[str]:
    text = "".join((ROOT / s).read_text() for s in SOURCES)
    return set(re.findall(r'"(taskmux_[a-z_]+)"', text))


def queried(dashboard: dict[str, object]) -> set[str]:
    names = set()
    for panel in dashboard["panels"]:  # type: ignore[attr-defined]
        for target in panel["targets"]:
            for name in re.findall(r"taskmux_[a-z_]+", target["expr"]):
                for suffix in SUFFIXES:
                    name = name.removesuffix(suffix)
                names.add(name)
    return names


def test_every_panel_queries_an_exported_metric() -> None:
    dashboard = json.loads((ROOT / "k8s/grafana/taskmux-dashboard.json").read_text())
    assert len(dashboard["panels"]) >= 5
    unknown = queried(dashboard) - exported()
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"


def test_a_misspelt_metric_is_caught() -> None:
    bad = {"panels": [{"targets": [{"expr": "rate(taskmux_gateway_reqests_total[1m])"}]}]}
    assert queried(bad) - exported() == {"taskmux_gateway_reqests"}
