"""What a worker pod does on SIGTERM, which its grace period (k8s/tools/drain.py) counts on:
it stops pulling, finishes what it holds, gives up at TASKMUX_DRAIN_TIMEOUT_S and exits,
leaving what it could not finish pending for another worker."""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from tests.clusters import ClusterFactory
from tests.harness import Cluster, Proc, serving, wait_until

LOAD_CALLS = 48


async def _embed_forever(target: str, stop: asyncio.Event) -> None:
    """Keep LOAD_CALLS Embed calls of 8 distinct texts in flight until `stop`."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)

        async def caller(n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                texts = [f"drain test text {n} {i} {k} about markets and rain" for k in range(8)]
                try:
                    await stub.Embed(pb.EmbedRequest(texts=texts), timeout=60)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(caller(n) for n in range(LOAD_CALLS)))


async def _sigterm_under_load(target: str, worker: Proc) -> list[int]:
    """SIGTERM the busy worker; its readiness answers from then until it exits."""
    stop = asyncio.Event()
    load = asyncio.create_task(_embed_forever(target, stop))
    await asyncio.sleep(3)
    worker.popen.send_signal(signal.SIGTERM)
    answers = []
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while worker.popen.poll() is None:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                answers.append(reply.status)
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    stop.set()
    load.cancel()
    return answers


def _busy_cluster(make_cluster: ClusterFactory, **worker_env: str) -> tuple[Cluster, str, Proc]:
    worker_env = {"reload_interval_ms": "0", **worker_env}
    cluster = make_cluster(workers=[worker_env], gateways=1, ready="catalog")
    worker = cluster.workers[0]
    wait_until(lambda: serving(worker.address), 60, "worker")
    return cluster, cluster.gateways[0].address, worker


def test_a_worker_gives_up_its_drain_after_the_timeout(make_cluster: ClusterFactory) -> None:
    """With more pulled than it can finish in TASKMUX_DRAIN_TIMEOUT_S=1, the worker stops
    at the timeout and exits cleanly (how fast is measured in k8s/README.md, "Draining";
    the 60 s wait only keeps a hang from stalling the run)."""
    cluster, target, worker = _busy_cluster(make_cluster, drain_timeout_s="1", read_count="256")
    stop = asyncio.Event()

    async def run() -> None:
        load = asyncio.create_task(_embed_forever(target, stop))
        await asyncio.sleep(3)
        worker.popen.send_signal(signal.SIGTERM)
        await asyncio.to_thread(worker.popen.wait, 60)
        stop.set()
        load.cancel()

    asyncio.run(run())
    assert worker.popen.returncode == 0, cluster.logs()
    log = worker.output()
    assert "signal received" in log
    assert "drain took over 1s" in log or "worker stopped" in log, log[-2000:]


def test_a_draining_worker_reports_not_serving(make_cluster: ClusterFactory) -> None:
    cluster, target, worker = _busy_cluster(make_cluster, drain_timeout_s="20")
    answers = asyncio.run(_sigterm_under_load(target, worker))
    assert worker.popen.returncode == 0, cluster.logs()
    assert answers, "the worker exited before its health answered"
    assert health_pb2.HealthCheckResponse.SERVING not in answers, answers
