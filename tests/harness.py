"""Real processes for integration tests: Valkey, gateways and workers on free ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from model.manifest import load_manifest
from taskmux.local import (
    component_command,
    component_env,
    free_port,
    redis_command,
    wait_for_redis,
)

STOP_TIMEOUT_S = 15
# The labelled data, beside the checkout as CI places it (not the working directory).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Each process serves /metrics on a free port, so processes of a test do not collide on 9100.
METRICS_ANY_PORT = {"TASKMUX_METRICS_ADDR": "127.0.0.1:0"}


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    address: str = ""  # its gRPC (gateway) or health (worker) address

    def output(self) -> str:
        """Everything the process logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit code."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class Cluster:
    """A Redis-compatible server plus any number of gateways and workers."""

    model_repo: Path
    workdir: Path
    redis_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(
        self, *, appendonly: bool = False, args: Sequence[str] = (), binary: str = ""
    ) -> Proc:
        """Start (or restart, same port and data folder) the Redis-compatible server,
        optionally another `binary` (e.g. one built with TLS) and with extra server `args`."""
        data = self.workdir / f"redis-{self.redis_port}"
        data.mkdir(parents=True, exist_ok=True)
        argv = redis_command(self.redis_port, data, appendonly=appendonly)
        argv = [binary or argv[0], *argv[1:], *args]
        proc = self._spawn("redis", argv, dict(os.environ))
        wait_for_redis(self.redis_url)
        return proc

    def start_worker(self, **env: str) -> Proc:
        address = f"127.0.0.1:{free_port()}"
        extra = {"TASKMUX_HEALTH_ADDR": address, **METRICS_ANY_PORT, **_prefixed(env)}
        proc = self._spawn(
            "worker",
            component_command("workers"),
            component_env(self.redis_url, self.model_repo, extra),
        )
        proc.address = address
        return proc

    def start_gateway(self, port: int | None = None, **env: str) -> tuple[Proc, str]:
        port = port or free_port()
        extra = {"TASKMUX_LISTEN_ADDR": f"127.0.0.1:{port}", **METRICS_ANY_PORT, **_prefixed(env)}
        proc = self._spawn(
            "gateway",
            component_command("gateway"),
            component_env(self.redis_url, self.model_repo, extra),
        )
        proc.address = f"127.0.0.1:{port}"
        return proc, proc.address

    @property
    def gateways(self) -> list[Proc]:
        return [p for p in self.procs if p.name == "gateway"]

    @property
    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.name == "worker"]

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.output()}" for p in self.procs)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc


def _prefixed(env: dict[str, str]) -> dict[str, str]:
    return {f"TASKMUX_{k.upper()}": v for k, v in env.items()}


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


async def wait_until_async(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str
) -> None:
    """`wait_until` for a test's event loop: await `check` until it holds."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await check():  # noqa: ASYNC110 (polls Redis state: no event to await)
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


def health_status(target: str, service: str = "") -> int | None:
    """The gateway's health status, or None if it does not answer."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError:
            return None
        status: int = response.status
        return status


def serving(target: str) -> bool:
    """True once the gateway reports SERVING."""
    return health_status(target) == health_pb2.HealthCheckResponse.SERVING


def listed_heads(target: str) -> set[str]:
    """The heads ListTasks reports at `target`, or an empty set if it does not answer."""
    with grpc.insecure_channel(target) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        try:
            return {h.name for h in stub.ListTasks(pb.ListTasksRequest(), timeout=2).heads}
        except grpc.RpcError:
            return set()


def wait_for_catalog(target: str, model_repo: Path, timeout_s: float = 60) -> None:
    """Wait until the gateway at `target` lists every head of `model_repo`."""
    expected = {h.name for h in load_manifest(model_repo, verify=False).heads}
    wait_until(lambda: listed_heads(target) == expected, timeout_s, f"catalog {sorted(expected)}")


class Background:
    """Runs `target(stop)` in a thread for the body of a `with`. On exit it sets `stop`,
    joins the thread and re-raises what the thread raised, so a failure there fails the
    test instead of vanishing with the thread."""

    def __init__(
        self, target: Callable[[threading.Event], None], *, name: str, join_timeout_s: float = 90
    ) -> None:
        self.done = threading.Event()
        self._target = target
        self._join_timeout_s = join_timeout_s
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name)

    def _run(self) -> None:
        try:
            self._target(self.done)
        except BaseException as err:  # re-raised in the test's thread by __exit__
            self._error = err

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        self._thread.join(self._join_timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"{self._thread.name} still runs {self._join_timeout_s}s on")
        if self._error is not None:
            raise self._error


def in_ci() -> bool:
    """True under CI=true (as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def missing(prerequisite: str) -> NoReturn:
    """A prerequisite is not installed: a skip on a laptop, a failure under CI=true, whose
    job is to install everything. `prerequisite` says what to install and how."""
    message = f"missing prerequisite: {prerequisite}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: nothing may be skipped)")
    pytest.skip(message)


NODE_CLIENT = Path(__file__).parent / "interop" / "node"


def require_node_client() -> Path:
    """The grpc-js interop client's folder, once node and its packages are installed."""
    if shutil.which("node") is None:
        missing("node: apt-get install nodejs npm (.ci/run does), then make interop-deps")
    if not (NODE_CLIENT / "node_modules").is_dir():
        missing("tests/interop/node/node_modules: run `make interop-deps` (npm ci there)")
    return NODE_CLIENT
