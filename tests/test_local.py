"""`taskmux up` and the CLI, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from taskmux.local import free_port
from tests.harness import health_status, serving, wait_until

pytestmark = pytest.mark.integration

TASKMUX = [sys.executable, "-m", "taskmux.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKMUX, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_up_serves_the_cli_and_stops_cleanly_on_ctrl_c(model_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TASKMUX_REDIS_URL", "TASKMUX_API_KEYS_FILE")
    }
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [*TASKMUX, "up", "--model-repo", str(model_repo), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: serving(target), 60, "taskmux up to serve")
        wait_until(lambda: _cli("tasks", "--target", target).returncode == 0, 60, "catalog")
        embed = _cli("embed", "--target", target, "hello", "world")
        assert embed.returncode == 0, embed.stderr
        vectors = json.loads(embed.stdout)["embeddings"]
        assert [len(v["values"]) for v in vectors] == [384, 384]
        heads = json.loads(_cli("tasks", "--target", target).stdout)["heads"]
        classifier = next(
            (h["name"] for h in heads if h["kind"] == "HEAD_KIND_CLASSIFICATION"), None
        )
        if classifier is not None:
            result = _cli("classify", "--target", target, "--head", classifier, "I loved it")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["results"][0]["label"]
        bad = _cli("classify", "--target", target, "--head", "nope", "x")
        assert bad.returncode == 1
        assert "NOT_FOUND" in bad.stderr
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(30)
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output
    assert "gateway on 127.0.0.1" in output
    assert "WARNING: AUTHENTICATION IS OFF" in output  # said loudly, before serving
    assert "worker stopped" in output


def test_taskmux_gateway_becomes_python_m_gateway(tmp_path: Path) -> None:
    """`taskmux gateway` runs the gateway's own entry point, which picks gRPC's settings
    before grpc is first imported: the same process, now `python -m gateway`."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "TASKMUX_LISTEN_ADDR": address,
        "TASKMUX_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing there
        "TASKMUX_METRICS_ADDR": "",
    }
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen([*TASKMUX, "gateway"], env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: health_status(address, "liveness") is not None, 30, "the gateway")
        cmdline = Path(f"/proc/{gateway.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"gateway"], cmdline
    finally:
        gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(30)
        log.close()
    assert code == 0, (tmp_path / "gateway.log").read_text()
