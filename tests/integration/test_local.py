"""`taskmux up` and the CLI, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from taskmux_client import TaskMuxClient, TaskMuxError
from taskmux_client.errors import ResourceExhaustedError, UnavailableError

from taskmux.local import free_port, port_is_free, wait_for_redis
from taskmux.supervisor import Backoff
from tests.harness import health_status, serving, wait_until

pytestmark = pytest.mark.integration

TASKMUX = [sys.executable, "-m", "taskmux.cli"]
SERVING = 1  # grpc.health.v1 HealthCheckResponse.SERVING
CALLERS = 4  # threads, each calling in a loop through its own default client
# Calls that may fail while Valkey is down (each fails only after all its retries).
MAX_OUTAGE_FAILURES = 40


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKMUX, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("seal", [False, True], ids=["plaintext", "sealed"])
def test_up_serves_the_cli_and_stops_cleanly_on_ctrl_c(
    model_repo: Path, tmp_path: Path, seal: bool
) -> None:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TASKMUX_REDIS_URL", "TASKMUX_API_KEYS_FILE", "TASKMUX_PAYLOAD_KEY_FILE")
    }
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [*TASKMUX, "up", "--model-repo", str(model_repo), "--port", str(port)]
        + (["--seal"] if seal else []),
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
    # Every gateway and worker says at start whether it seals payloads.
    assert ("payloads sealed at rest" in output) == seal, output
    assert ("payloads are PLAINTEXT at rest" in output) == (not seal), output


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


def test_backoff_doubles_to_its_cap_and_resets_after_a_long_run() -> None:
    backoff = Backoff(initial_s=0.5, max_s=10, reset_after_s=30)
    assert [backoff.delay_s(ran_for_s=1) for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.delay_s(ran_for_s=30) == 0.5
    assert backoff.delay_s(ran_for_s=1) == 1


@dataclass
class Up:
    """A running `taskmux up`, read through its log."""

    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self, name: str) -> list[int]:
        """Every pid `name` was started with, oldest first."""
        return [
            int(p) for p in re.findall(rf"started {re.escape(name)} \(pid (\d+)\)", self.output())
        ]

    def workers(self) -> list[tuple[str, str]]:
        """(id, health address) of each worker."""
        return re.findall(r"worker (w\d-\w+) health on (127\.0\.0\.1:\d+)", self.output())

    def redis_url(self) -> str:
        found: list[str] = re.findall(r"embedded Valkey on (redis://\S+) ", self.output())
        return found[0]

    def terminate(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise


@pytest.fixture
def up(model_repo: Path, tmp_path: Path) -> Iterator[Up]:
    """`taskmux up --workers 2` on a free port, serving; stopped after the test."""
    port = free_port()
    drop = ("TASKMUX_REDIS_URL", "TASKMUX_API_KEYS_FILE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # A killed worker's jobs are taken over after 1 s, well inside the client's deadline.
    env["TASKMUX_CLAIM_IDLE_MS"] = "1000"
    # The gateway refuses calls while its last Redis check failed; checking every 0.1 s
    # (not 1 s), it notices Valkey is back well within one call's retries.
    env["TASKMUX_MONITOR_INTERVAL_MS"] = "100"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*TASKMUX, "up", "--model-repo", str(model_repo), "--port", str(port),
             "--workers", "2"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    running = Up(popen, log, port)
    try:
        wait_until(lambda: "Ctrl-C stops everything" in running.output(), 60, "up to start")
        for _, address in running.workers():
            wait_until(lambda a=address: health_status(a) == SERVING, 120, f"worker {address}")
        wait_until(lambda: serving(running.target), 60, "the gateway to serve")
        yield running
    finally:
        running.terminate()


@dataclass
class Callers:
    """A steady stream of Embed calls from CALLERS threads, each with the default client
    (it retries UNAVAILABLE within its deadline); every call's start and error is kept."""

    target: str
    calls: list[tuple[float, TaskMuxError | None]] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Callers:
        for n in range(CALLERS):
            thread = threading.Thread(target=self._call, args=(n,))
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(120)

    def _call(self, n: int) -> None:
        with TaskMuxClient(self.target) as client:
            i = 0
            while not self._done.is_set():
                started, error = time.monotonic(), None
                try:
                    client.embed([f"caller {n} sentence {i}"])
                except TaskMuxError as err:
                    error = err
                self.calls.append((started, error))
                i += 1

    def failures(self) -> list[tuple[float, TaskMuxError]]:
        return [(t, err) for t, err in list(self.calls) if err is not None]

    def wait_for_successes(self, count: int, started_after: float = 0.0) -> None:
        def enough() -> bool:
            ok = [t for t, err in list(self.calls) if err is None and t >= started_after]
            return len(ok) >= count

        wait_until(enough, 120, f"{count} successful calls")


def _restarted(up: Up, name: str, victim: int) -> int:
    """Wait for the supervisor to log `victim`'s exit and start `name` again; the new pid."""
    wait_until(
        lambda: f"{name} (pid {victim}) exited with code -9; restarting in" in up.output(),
        30,
        f"the supervisor to notice {name} exited",
    )
    wait_until(lambda: up.pids(name)[-1] != victim, 60, f"{name} to start again")
    return up.pids(name)[-1]


def test_a_killed_worker_is_restarted_and_no_call_fails(up: Up) -> None:
    worker, health = up.workers()[0]
    name = f"worker {worker}"
    with Callers(up.target) as callers:
        callers.wait_for_successes(20)
        victim = up.pids(name)[-1]
        os.kill(victim, signal.SIGKILL)
        again = _restarted(up, name, victim)
        wait_until(lambda: health_status(health) == SERVING, 120, "the worker to serve again")
        callers.wait_for_successes(20, started_after=time.monotonic())
    assert callers.failures() == []
    assert b"workers" in Path(f"/proc/{again}/cmdline").read_bytes()
    assert up.terminate() == 0, up.output()


def test_a_killed_valkey_comes_back_on_its_port_from_its_append_only_file(up: Up) -> None:
    url = up.redis_url()
    client = redis.Redis.from_url(url)
    client.set("test:acknowledged", "before the kill")
    with Callers(up.target) as callers:
        callers.wait_for_successes(20)
        victim = up.pids("Valkey")[-1]
        os.kill(victim, signal.SIGKILL)
        _restarted(up, "Valkey", victim)
        wait_for_redis(url, timeout_s=60)
        wait_until(lambda: serving(up.target), 60, "the gateway to see Valkey again")
        back = time.monotonic()
        callers.wait_for_successes(20, started_after=back)
    assert client.get("test:acknowledged") == b"before the kill"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    client.close()
    failures = callers.failures()
    print(f"valkey kill -9: {len(failures)} of {len(callers.calls)} calls failed, all before")
    assert [err for t, err in failures if t >= back] == []
    assert all(isinstance(e, UnavailableError | ResourceExhaustedError) for _, e in failures)
    assert len(failures) <= MAX_OUTAGE_FAILURES, f"{len(failures)} of {len(callers.calls)}"
    assert up.terminate() == 0, up.output()


def _children(pid: int) -> set[int]:
    """The processes `pid` started and has not reaped (from any of its threads)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return found


def test_sigterm_stops_every_child_and_exits_0(up: Up) -> None:
    children = _children(up.popen.pid)
    started = {int(p) for p in re.findall(r"started .+ \(pid (\d+)\)", up.output())}
    assert children == started and len(children) == 4  # Valkey, 2 workers, a gateway
    assert up.terminate() == 0, up.output()
    assert not [p for p in children if Path(f"/proc/{p}").exists()]
    output = up.output()
    assert "restarting" not in output
    assert output.count("worker stopped") == 2
    assert port_is_free(up.port)
