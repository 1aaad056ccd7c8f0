"""The Redis cost bench (bench/redis_cost.py) on a tiny run: every call is counted, the
commands the code sends per call are there in the numbers the code implies, and the table
and JSON say so. No timing decides anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.redis_cost import main

CALLS = 12


@pytest.mark.integration
def test_a_tiny_run_counts_the_commands_of_each_call(
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cost.json"
    argv = ["--repo", str(model_repo), "--calls", str(CALLS), "--concurrency", "1,4"]
    assert main([*argv, "--idle-s", "1", "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    costs = {(c["keyed"], c["concurrency"]): c for c in run["costs"]}
    assert set(costs) == {(True, 1), (False, 1), (True, 4), (False, 4)}
    for (keyed, _), c in costs.items():
        assert c["calls"] == CALLS and c["failed_attempts"] == 0
        commands = c["by_command"]
        # Every call: the enqueue script (XLEN, XADD), the worker's XREADGROUP and its
        # MULTI (reply XADD, XACK, XDEL), the gateway's XREAD and XDEL of the reply.
        for name in ("evalsha", "xlen", "xreadgroup", "multi", "exec", "xack", "xdel", "xread"):
            assert commands.get(name, 0) > 0, name
        assert commands["xadd"] == pytest.approx(2, abs=0.1)  # the job and its reply
        # One XACK and one XDEL per batch (workers/consumer.py), whatever it holds.
        assert 0 < commands["xack"] <= 1.01
        # A keyed call adds its claim (SET NX) and the store script (GET, SET).
        assert commands["evalsha"] == pytest.approx(2 if keyed else 1, abs=0.1)
        assert commands.get("set", 0) == pytest.approx(2 if keyed else 0, abs=0.1)
        assert c["commands_per_call"] >= sum(commands.values()) - 0.01
        assert c["commands_per_call"] > (10 if keyed else 6)
        assert c["reads_per_call"] > 1 and c["cpu_us_per_call"] > 0
        assert c["calls_per_core_s"] == pytest.approx(1e6 / c["cpu_us_per_call"])
    # One call at a time, each read and transaction carries one job: nothing amortized.
    assert costs[False, 1]["by_command"]["xreadgroup"] == pytest.approx(1, abs=0.1)
    assert costs[False, 1]["by_command"]["xack"] == pytest.approx(1, abs=0.1)
    assert run["idle"]["commands_per_s"] > 0
    table = capsys.readouterr().out
    assert "| **commands per call** |" in table and "| `EVALSHA` |" in table
    assert "keyed, c=1" in table and "unkeyed, c=4" in table
