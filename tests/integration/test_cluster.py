"""`taskmux up --gateways N --workers M`: the local cluster rehearsal, as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2, taskmux_pb2_grpc

from router import keys
from taskmux import local
from taskmux.local import free_port, port_is_free
from tests.harness import health_status, serving, wait_until

pytestmark = pytest.mark.integration

TASKMUX = [sys.executable, "-m", "taskmux.cli"]
SERVING = 1  # grpc.health.v1 HealthCheckResponse.SERVING
MAX_CALLS = 300  # one new connection each; the kernel picks a gateway per connection


def _embed_on_new_connection(target: str, text: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        reply = stub.Embed(taskmux_pb2.EmbedRequest(texts=[text]), timeout=30)
    assert len(reply.embeddings) == 1


def _started(log: Path, pattern: str) -> list[tuple[str, str]]:
    return re.findall(pattern, log.read_text(errors="replace"))


def test_two_gateways_on_one_port_and_two_workers_all_serve(
    model_repo: Path, tmp_path: Path
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "TASKMUX_REDIS_URL"}
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [*TASKMUX, "up", "--model-repo", str(model_repo), "--port", str(port),
             "--gateways", "2", "--workers", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "Ctrl-C stops everything" in log_path.read_text(), 60, "up to start")
        gateways = _started(log_path, r"gateway (gw\d-\w+) on (127\.0\.0\.1:\d+)")
        workers = _started(log_path, r"worker (w\d-\w+) health on (127\.0\.0\.1:\d+)")
        redis_url = _started(log_path, r"embedded Valkey on (redis://\S+) ")[0]
        assert [address for _, address in gateways] == [target, target]
        assert len({address for _, address in workers}) == 2
        for _, address in workers:
            wait_until(lambda a=address: health_status(a) == SERVING, 120, f"worker on {address}")
            assert health_status(address, "liveness") == SERVING
        wait_until(
            lambda: all(f"gateway {gw} listening" in log_path.read_text() for gw, _ in gateways),
            60,
            "both gateways to listen",
        )
        wait_until(lambda: serving(target), 60, "the gateways to be ready")

        client = redis.Redis.from_url(redis_url)
        assert client.config_get("appendonly")["appendonly"] == "yes"

        def served_gateways() -> set[str]:
            served = set()
            for gw, _ in gateways:
                stream = keys.reply_stream(gw)
                if client.exists(stream) and client.xinfo_stream(stream)["entries-added"] > 0:
                    served.add(gw)
            return served

        def served_workers() -> set[str]:
            consumers = client.xinfo_consumers(keys.task_stream("embed"), keys.WORKER_GROUP)
            return {c["name"].decode() for c in consumers if c.get("inactive", -1) >= 0}

        for i in range(MAX_CALLS):
            _embed_on_new_connection(target, f"hello {i}")
            if i % 10 == 9 and len(served_gateways()) == 2 and len(served_workers()) == 2:
                break
        assert served_gateways() == {gw for gw, _ in gateways}
        assert served_workers() == {w for w, _ in workers}
        client.close()
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
    output = log_path.read_text(errors="replace")
    assert code == 0, output
    assert output.count("worker stopped") == 2, output
    assert port_is_free(port), "a gateway still holds the port"


def test_up_refuses_a_port_already_in_use(model_repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*TASKMUX, "up", "--model-repo", str(model_repo), "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert "already in use" in result.stderr


def test_without_a_balancing_shared_port_each_gateway_gets_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local, "reuse_port_balances", lambda: False)
    layout = local.plan_layout(50051, gateways=3, workers=2)
    assert layout.gateway_ports[0] == 50051
    assert len(set(layout.gateway_ports)) == 3
    assert layout.target() == "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in layout.gateway_ports)
    assert len(set(layout.worker_health_ports)) == 2
    assert len({layout.gateway_id(i) for i in range(3)}) == 3
