"""Run a worker: `python -m workers` (or `taskmux worker`), configured by TASKMUX_* env vars."""

from __future__ import annotations

import os

# OpenBLAS reads its thread count once, when numpy first loads it, so this precedes every
# import of numpy. The heads' matrix products are small, and OpenBLAS's own threads
# busy-wait after each one on the cores ONNX Runtime's threads need for the next batch:
# `bench/analyze_cost.py`'s load took 11.6 to 11.9 s of worker CPU per 1,000 Analyze texts
# with its default (one thread per core) against 8.1 s with one (Embed, which multiplies
# nothing, unchanged at 4.2 to 4.5 s). An operator's own OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import asyncio
import logging
import sys

from opentelemetry.sdk.trace.export import SpanExporter

from model.encoder import ProviderError
from model.loaded import LoadedModel
from model.manifest import ModelRepoError
from router.connection import connect
from router.messages import ANALYZE_STREAM_HEAD
from router.payload import log_at_rest
from taskmux.config import SettingsError
from taskmux.health import Health
from taskmux.lifecycle import cancel_and_wait, install_stop_signals, run_process
from taskmux.logs import configure_from_env
from taskmux.metrics import metrics_endpoint
from taskmux.tracing import Tracing
from workers.metrics import BacklogSampler
from workers.settings import WorkerSettings, settings_from_environ
from workers.worker import Worker

log = logging.getLogger("workers")


async def serve(
    settings: WorkerSettings, stop: asyncio.Event, *, span_exporter: SpanExporter | None = None
) -> None:
    """Report health, load the model, then serve until `stop` is set.

    `span_exporter` turns tracing on with that exporter, whatever the settings say.
    """
    health = Health()
    await health.start()
    async with health.serving_alone(settings.health_addr):
        try:
            model = await asyncio.to_thread(LoadedModel.load, settings)
            await health.set_started()
            redis = connect(settings.redis, block_ms=settings.block_ms)
            try:
                log.info("serving heads %s on %s", sorted(model.heads), model.encoder.provider)
                tracing = Tracing(
                    settings.trace,
                    service="taskmux-worker",
                    instance=settings.worker_id,
                    exporter=span_exporter,
                )
                worker = Worker(settings, model, redis, health, tracing)
                with tracing, metrics_endpoint(settings.metrics_addr, worker.metrics.registry):
                    async with BacklogSampler(
                        redis, worker.metrics, lambda: [*worker.model.heads, ANALYZE_STREAM_HEAD]
                    ):
                        await run_with_drain_limit(worker, stop, settings)
            finally:
                await redis.aclose()
                # Reloads share the replicas' threads with this encoder (with_branches).
                model.encoder.close()
        finally:
            await health.stop()


async def run_with_drain_limit(
    worker: Worker, stop: asyncio.Event, settings: WorkerSettings
) -> None:
    """Run the worker; once `stop` is set, give it `drain_timeout_s` to finish."""
    task = asyncio.create_task(worker.run(stop))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(task), settings.drain_timeout_s)
    except TimeoutError:
        # What is left stays pending in Redis; live workers reclaim it after claim_idle_ms.
        log.error("drain took over %ds; exiting with work left pending", settings.drain_timeout_s)
        await cancel_and_wait(task)


def main() -> int:
    """Process entry point."""
    configure_from_env(os.environ, default_format="json")
    try:
        settings = settings_from_environ()
    except SettingsError as err:
        log.error("cannot start: %s", err)
        return 2
    log.info("starting %s", settings.describe())
    log_at_rest(log, settings.payload_cipher)

    async def run() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop, log)
        await serve(settings, stop)

    try:
        run_process(run())
    except ModelRepoError as err:
        log.error("cannot load the model repository: %s", err)
        return 2
    except ProviderError as err:
        log.error("cannot run the encoder on the providers asked for: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
