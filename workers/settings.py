"""Worker settings, read once from `TASKMUX_*` environment variables."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from model.spin import SpinInRun
from router.connection import RedisSettings
from router.payload import PayloadCipher, load_cipher
from taskmux.config import (
    SettingsError,
    env_bool,
    env_int,
    env_list,
    env_on_off_auto,
    env_str,
)
from taskmux.tracing import TraceSettings


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs to know."""

    # Redis holding the task streams (the same one the gateways use) and its credentials.
    redis: RedisSettings = field(default_factory=RedisSettings)
    # Model repository folder built by `make model`.
    model_repo: Path = Path("model-repo")
    # host:port of the worker's gRPC health service (probes); port 0 picks a free one.
    health_addr: str = "[::]:50052"
    # Consumer name in the group; unique per worker process (defaults to host + random).
    worker_id: str = ""
    # ONNX Runtime providers in order, or "auto" (CUDA when present, else CPU).
    providers: tuple[str, ...] = ("auto",)
    # Encoder variant: "auto" (fp16 on a GPU, else int8 if built, else fp32), "fp32",
    # "int8" (CPU, dynamically quantised) or "fp16" (GPU).
    encoder_variant: str = "auto"
    # ONNX Runtime intra-op threads; 0 lets ONNX Runtime use every core.
    intra_op_threads: int = 0
    # Whether ONNX Runtime's idle threads busy-wait for the next call. Off: they would take
    # the cores the gateway and Redis need between batches. On only for a worker that has
    # its cores to itself and wants the last fraction of a millisecond per call.
    ort_spin: bool = False
    # Whether they busy-wait within a run only (between one operator's parallel part and
    # the next), stopping as soon as it returns, so a small batch pays no thread wake-ups
    # and nothing spins between batches. That is faster while the encoder has the cores
    # to itself and slower when another process takes one (a spinning thread waits on a
    # descheduled peer), so "auto" opens the multi-thread session both ways and runs a lone
    # small batch the way that has been faster lately (`model/spin.py`; batches under load
    # never spin); "on" always, "off" never.
    ort_spin_in_run: SpinInRun = "auto"
    # Single-thread copies of the encoder that run a big batch in slices at once, on a CPU
    # (GPU: none): 0 one per intra-op thread (at most 4), 1 none. Each holds another copy of the
    # weights; set 1 where memory is tight or the worker has one core.
    encoder_replicas: int = 0
    # Stream entries pulled per stream per XREADGROUP; raise for bigger batches.
    read_count: int = 64
    # How long one XREADGROUP waits for work before looping.
    block_ms: int = 1000
    # Most padded tokens (rows x longest) in one encoder call; bounds memory and latency.
    max_batch_tokens: int = 16384
    # Most texts in one encoder call.
    max_batch_rows: int = 256
    # Longest a batch waits for more work, once the encoder is free, after its first job
    # arrived. 0 starts at once: under load, jobs that arrive while the encoder runs form
    # the next batch anyway, so waiting only adds latency; raise it for fuller batches
    # at light load (a GPU with a large fixed cost per call).
    max_wait_ms: int = 0
    # Relative share of batch rows per head under contention, e.g. "intent=4,embed=1";
    # heads not named weigh 1. No head starves, whatever the weights.
    task_weights: tuple[tuple[str, int], ...] = ()
    # Texts a worker may hold pulled and unanswered, in batches of max_batch_rows (the
    # batch computing included). 1 keeps the backlog in the streams, where every worker
    # and the autoscaler see it; raise it only if the encoder idles between batches.
    prefetch_batches: int = 1
    # Pending entries idle this long belong to a dead or stuck worker and are reclaimed
    # (XAUTOCLAIM); live workers refresh what they hold well before that.
    claim_idle_ms: int = 30_000
    # Deliveries after which an entry goes to the dead-letter stream with an error reply.
    max_deliveries: int = 5
    # After SIGTERM: how long to finish and acknowledge pulled work before exiting.
    drain_timeout_s: int = 20
    # How often the model repository is checked for new or updated heads; 0 disables.
    reload_interval_ms: int = 2000
    # How often the model catalog is re-published to Redis.
    catalog_refresh_s: int = 10
    # host:port of the Prometheus endpoint (/metrics); port 0 picks a free one, "" disables.
    metrics_addr: str = "0.0.0.0:9101"
    # OpenTelemetry tracing (exporter, endpoint, sample ratio): off unless an exporter is set.
    trace: TraceSettings = field(default_factory=TraceSettings)
    # The payload keys, from the key file TASKMUX_PAYLOAD_KEY_FILE (a mounted Secret, the
    # same on every gateway and worker; router/payload.py): texts and results are sealed
    # in Redis. None (unset) keeps them plaintext at rest; set it in production.
    payload_cipher: PayloadCipher | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        """Settings from the environment; unset variables take the defaults above."""
        default = cls()
        return cls(
            redis=RedisSettings.from_env(env),
            model_repo=Path(env_str(env, "MODEL_REPO", str(default.model_repo))),
            health_addr=env_str(env, "HEALTH_ADDR", default.health_addr),
            worker_id=env_str(env, "WORKER_ID", f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"),
            providers=env_list(env, "PROVIDERS", default.providers),
            encoder_variant=env_str(env, "ENCODER_VARIANT", default.encoder_variant),
            intra_op_threads=env_int(env, "INTRA_OP_THREADS", default.intra_op_threads),
            ort_spin=env_bool(env, "ORT_SPIN", default.ort_spin),
            ort_spin_in_run=cast(
                SpinInRun, env_on_off_auto(env, "ORT_SPIN_IN_RUN", default.ort_spin_in_run)
            ),
            encoder_replicas=env_int(
                env, "ENCODER_REPLICAS", default.encoder_replicas, maximum=MAX_REPLICAS
            ),
            read_count=env_int(env, "READ_COUNT", default.read_count, minimum=1),
            block_ms=env_int(env, "BLOCK_MS", default.block_ms, minimum=1, maximum=60_000),
            max_batch_tokens=env_int(
                env, "MAX_BATCH_TOKENS", default.max_batch_tokens, minimum=256
            ),
            max_batch_rows=env_int(env, "MAX_BATCH_ROWS", default.max_batch_rows, minimum=1),
            max_wait_ms=env_int(env, "MAX_WAIT_MS", default.max_wait_ms, maximum=10_000),
            task_weights=parse_weights(env_list(env, "TASK_WEIGHTS", ())),
            prefetch_batches=env_int(env, "PREFETCH_BATCHES", default.prefetch_batches, minimum=1),
            claim_idle_ms=env_int(env, "CLAIM_IDLE_MS", default.claim_idle_ms, minimum=100),
            max_deliveries=env_int(env, "MAX_DELIVERIES", default.max_deliveries, minimum=1),
            drain_timeout_s=env_int(env, "DRAIN_TIMEOUT_S", default.drain_timeout_s),
            reload_interval_ms=env_int(env, "RELOAD_INTERVAL_MS", default.reload_interval_ms),
            catalog_refresh_s=env_int(
                env, "CATALOG_REFRESH_S", default.catalog_refresh_s, minimum=1
            ),
            metrics_addr=env_str(env, "METRICS_ADDR", default.metrics_addr),
            trace=TraceSettings.from_env(env),
            payload_cipher=load_cipher(env_str(env, "PAYLOAD_KEY_FILE", "")),
        )

    def describe(self) -> str:
        """One log line, with secrets redacted."""
        return (
            f"worker {self.worker_id} redis={self.redis.describe()} repo={self.model_repo} "
            f"providers={','.join(self.providers)} threads={self.intra_op_threads or 'auto'} "
            f"replicas={self.encoder_replicas or 'auto'} "
            f"batch={self.max_batch_rows} rows/{self.max_batch_tokens} tokens"
        )


# More copies than cores only add memory; the bound catches a mistyped value.
MAX_REPLICAS = 256


def parse_weights(items: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """("intent=4", "embed=1") as ((intent, 4), (embed, 1)); SettingsError if malformed."""
    weights = []
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            raise SettingsError(f"TASKMUX_TASK_WEIGHTS item {item!r} must be HEAD=N with N >= 1")
        weights.append((name.strip(), int(value)))
    return tuple(weights)


def settings_from_environ() -> WorkerSettings:
    """Settings from this process's environment."""
    return WorkerSettings.from_env(os.environ)
