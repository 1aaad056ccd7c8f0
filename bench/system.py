"""The full system under load: `taskmux up` in a child process, driven by the load tester."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc
from taskmux_client.channel import auth_metadata, open_channel

from taskmux.clientargs import ClientSecurity
from taskmux.loadtest.config import LoadConfig, parse_lengths, parse_mix
from taskmux.loadtest.report import LoadReport
from taskmux.loadtest.runner import run_load
from taskmux.local import free_port, redis_command, wait_for_redis


@contextmanager
def valkey(data_dir: Path) -> Iterator[str]:
    """A Valkey of our own, as `taskmux up` would start, so the bench can read its keys."""
    data_dir.mkdir()
    port = free_port()
    # Fixed argv (the bundled Valkey binary), no shell.
    server = subprocess.Popen(redis_command(port, data_dir, appendonly=True))  # nosec B603
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_redis(url)
        yield url
    finally:
        server.terminate()
        server.wait(30)


@contextmanager
def running_system(
    repo: Path,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    security: ClientSecurity | None = None,
    stdout: Path | None = None,
    workers: int = 1,
    cwd: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Valkey, one gateway and `workers` workers, as `make run` (`taskmux up --workers N`)
    starts them; (target, process).

    `env` configures them (an existing Valkey, TLS, keys, tracing); `security` is what a
    client needs to reach the gateway then. `stdout`, when given, takes the processes'
    stdout (where the console trace exporter writes) apart from the log. Ready once the
    gateway answers an Embed, which takes one worker: wait for the others apart. `cwd`, when
    given, is the source tree the processes import (`python -m` puts it first on the path).
    """
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if k != "TASKMUX_REDIS_URL"}
    child_env.update(env or {})
    with log.open("wb") as err, stdout.open("wb") if stdout else nullcontext(err) as out:
        # Fixed argv (this venv's taskmux), no shell.
        up = subprocess.Popen(  # nosec B603
            [
                sys.executable,
                "-m",
                "taskmux.cli",
                "up",
                "--model-repo",
                str(repo),
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=child_env,
            cwd=cwd,
            stdout=out,
            stderr=err,
        )
    target = f"127.0.0.1:{port}"
    try:
        _wait_ready(target, up, security or ClientSecurity())
        yield target, up
    finally:
        interrupt(up, 60)


def interrupt(process: subprocess.Popen[bytes], wait_s: float) -> None:
    """SIGINT, as Ctrl-C would, so `process` shuts down in order; killed after `wait_s`."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()


def _wait_ready(
    target: str, up: subprocess.Popen[bytes], security: ClientSecurity, timeout_s: float = 120
) -> None:
    deadline = time.monotonic() + timeout_s
    credentials = security.tls.credentials() if security.tls else None
    metadata = auth_metadata(security.api_key)
    with open_channel(target, credentials, ()) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        while time.monotonic() < deadline:
            if up.poll() is not None:
                raise RuntimeError("taskmux up exited before serving; see its log")
            try:
                stub.ListTasks(pb.ListTasksRequest(), timeout=2, metadata=metadata)
                stub.Embed(pb.EmbedRequest(texts=["warm up"]), timeout=30, metadata=metadata)
                return
            except grpc.RpcError:
                time.sleep(0.2)
    raise RuntimeError(f"taskmux at {target} not ready after {timeout_s}s")


def load(
    target: str,
    mix: str,
    concurrency: int,
    lengths: str,
    duration_s: float,
    warmup_s: float,
    security: ClientSecurity | None = None,
    *,
    texts_per_request: int = 1,
) -> LoadReport:
    """One closed-loop run; every call carries a fresh idempotency key, as the default
    client sends (LoadConfig's default)."""
    security = security or ClientSecurity()
    config = LoadConfig(
        target=target,
        mode="closed",
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
        mix=parse_mix(mix),
        lengths=parse_lengths(lengths),
        texts_per_request=texts_per_request,
        connections=min(concurrency, 8),
        deadline_s=60,
        tls=security.tls,
        api_key=security.api_key,
    )
    return asyncio.run(run_load(config))


def child_pid(parent: int, module: str) -> int | None:
    """The pid of `python -m <module>` started by `parent`, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"-m" in cmdline and module.encode() in cmdline:
            return int(entry.name)
    return None


def children(up: int) -> dict[str, int]:
    """The gateway, worker and Valkey that `taskmux up` (pid `up`) started."""
    names = {"gateway": "gateway", "worker": "workers"}
    pids = {p: pid for p, m in names.items() if (pid := child_pid(up, m)) is not None}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in pids.values():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == up and "valkey" in stat:
                    pids["valkey"] = int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
    return pids


def cpu_seconds(pid: int) -> float:
    """User and system CPU time that `pid` has used so far, all threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def profile(pid: int, duration_s: float, out: Path) -> subprocess.Popen[bytes]:
    """Start py-spy sampling `pid` for `duration_s` into `out` (raw collapsed stacks)."""
    spy = Path(sys.executable).with_name("py-spy")
    argv = [str(spy), "record", "--pid", str(pid), "--duration", str(int(duration_s)),
            "--rate", "100", "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # nosec B603


def top_frames(raw: Path, n: int = 10) -> list[tuple[str, float]]:
    """The `n` functions where the profiled process spent most samples (self time), as
    (frame, share of samples)."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[stack.split(";")[-1]] += int(count)
        total += int(count)
    return [(frame, c / total) for frame, c in counts.most_common(n)] if total else []
