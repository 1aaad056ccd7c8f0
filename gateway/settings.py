"""Gateway settings, read once from `TASKMUX_*` environment variables."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from router.connection import RedisSettings
from router.payload import PayloadCipher, load_cipher
from taskmux.config import SettingsError, env_float, env_int, env_str
from taskmux.tracing import TraceSettings


@dataclass(frozen=True)
class GatewaySettings:
    """Everything a gateway process needs to know."""

    # Redis holding the task streams (the same one the workers use) and its credentials.
    redis: RedisSettings = field(default_factory=RedisSettings)
    # host:port to serve gRPC on; "[::]:50051" listens on every interface.
    listen_addr: str = "[::]:50051"
    # Unique per gateway process; names its reply stream. Random unless set.
    gateway_id: str = ""
    # Most texts in one request; raise it if callers send bigger batches.
    max_texts_per_request: int = 128
    # Most characters in one text; longer inputs are rejected, not truncated.
    max_text_chars: int = 8192
    # Most candidates in one Similarity call.
    max_candidates: int = 256
    # Most labels in one ZeroShotClassify call.
    max_labels: int = 64
    # Most heads in one Analyze call.
    max_heads_per_request: int = 16
    # Tasks in flight per Pipeline stream before the gateway stops reading from it.
    max_pipeline_in_flight: int = 64
    # Timeout for calls that carry no deadline.
    default_timeout_ms: int = 30_000
    # Largest gRPC message accepted, in bytes.
    max_message_bytes: int = 8 * 1024 * 1024
    # How long the reply stream of a dead gateway survives in Redis.
    reply_ttl_s: int = 60
    # How often Redis health, the head catalog and Redis memory (gateway/memory.py) are checked.
    monitor_interval_ms: int = 1000
    # How long in-flight calls may finish after SIGTERM.
    drain_timeout_s: int = 10
    # Age at which a client connection is asked to reconnect (HTTP/2 GOAWAY), so that
    # round-robin clients spread over gateways added since; lower it to rebalance sooner.
    max_connection_age_s: int = 300
    # How long calls already on an aged connection may still finish; keep it at least the
    # longest deadline callers use (default_timeout_ms), or such calls are cut.
    max_connection_age_grace_s: int = 30
    # How long a result stays bound to its idempotency key. The default client retries only
    # within its call deadline (30 s), so 60 s covers every retry of a call with room to
    # spare; raise it if your clients retry over longer spans. Redis holds about one
    # response per keyed call for this long (calls/s x TTL x response size).
    idempotency_ttl_s: int = 60
    # Fraction of Redis's maxmemory at which new calls get RESOURCE_EXHAUSTED with a retry
    # hint (gateway/memory.py) instead of failing at the limit; 0 turns the guard off.
    redis_memory_high_water: float = 0.85
    # Most jobs queued or in flight per head stream before calls for that head get
    # RESOURCE_EXHAUSTED; lower it to shed load sooner, raise it to absorb longer bursts.
    max_backlog: int = 10_000
    # Retry hint sent with RESOURCE_EXHAUSTED for a full stream; about how long the
    # workers take to drain a meaningful part of a full backlog.
    backlog_retry_after_ms: int = 1000
    # PEM server certificate (chain); set it with tls_key_file to serve TLS instead of plaintext.
    tls_cert_file: str = ""
    # PEM private key of tls_cert_file.
    tls_key_file: str = ""
    # PEM CA bundle for client certificates; set it to require mutual TLS (needs tls_cert_file).
    tls_client_ca_file: str = ""
    # JSON or TOML file of tenants and their hashed API keys (see gateway/auth.py); unset
    # means no authentication, for local development only.
    api_keys_file: str = ""
    # host:port of the Prometheus endpoint (/metrics); port 0 picks a free one, "" disables.
    metrics_addr: str = "0.0.0.0:9100"
    # host:port of a plaintext gRPC server that serves only health, for probes that cannot
    # speak TLS (kubelet's); "" serves health on listen_addr only.
    health_addr: str = ""
    # host:port of the OpenAI-compatible HTTP API (POST /v1/embeddings, gateway/openai_http.py),
    # with the TLS and API keys of listen_addr; port 0 picks a free one, "" (the default)
    # serves none. `taskmux up` serves it on 127.0.0.1:8080; k8s/base on [::]:8080.
    http_addr: str = ""
    # OpenTelemetry tracing (exporter, endpoint, sample ratio): off unless an exporter is set.
    trace: TraceSettings = field(default_factory=TraceSettings)
    # The payload keys, from the key file TASKMUX_PAYLOAD_KEY_FILE (a mounted Secret, the
    # same on every gateway and worker; router/payload.py): texts and results are sealed
    # in Redis. None (unset) keeps them plaintext at rest; set it in production.
    payload_cipher: PayloadCipher | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewaySettings:
        """Settings from the environment; unset variables take the defaults above."""
        d = cls()
        security = _security_from_env(env)
        return cls(
            redis=RedisSettings.from_env(env),
            listen_addr=env_str(env, "LISTEN_ADDR", d.listen_addr),
            gateway_id=env_str(env, "GATEWAY_ID", uuid.uuid4().hex[:12]),
            max_texts_per_request=env_int(
                env, "MAX_TEXTS_PER_REQUEST", d.max_texts_per_request, minimum=1
            ),
            max_text_chars=env_int(env, "MAX_TEXT_CHARS", d.max_text_chars, minimum=1),
            max_candidates=env_int(env, "MAX_CANDIDATES", d.max_candidates, minimum=1),
            max_labels=env_int(env, "MAX_LABELS", d.max_labels, minimum=2),
            max_heads_per_request=env_int(
                env, "MAX_HEADS_PER_REQUEST", d.max_heads_per_request, minimum=1
            ),
            max_pipeline_in_flight=env_int(
                env, "MAX_PIPELINE_IN_FLIGHT", d.max_pipeline_in_flight, minimum=1
            ),
            default_timeout_ms=env_int(env, "DEFAULT_TIMEOUT_MS", d.default_timeout_ms, minimum=1),
            max_message_bytes=env_int(env, "MAX_MESSAGE_BYTES", d.max_message_bytes, minimum=1024),
            reply_ttl_s=env_int(env, "REPLY_TTL_S", d.reply_ttl_s, minimum=5),
            monitor_interval_ms=env_int(
                env, "MONITOR_INTERVAL_MS", d.monitor_interval_ms, minimum=50
            ),
            drain_timeout_s=env_int(env, "DRAIN_TIMEOUT_S", d.drain_timeout_s),
            max_connection_age_s=env_int(
                env, "MAX_CONNECTION_AGE_S", d.max_connection_age_s, minimum=1
            ),
            max_connection_age_grace_s=env_int(
                env, "MAX_CONNECTION_AGE_GRACE_S", d.max_connection_age_grace_s, minimum=1
            ),
            idempotency_ttl_s=env_int(env, "IDEMPOTENCY_TTL_S", d.idempotency_ttl_s, minimum=1),
            redis_memory_high_water=env_float(
                env, "REDIS_MEMORY_HIGH_WATER", d.redis_memory_high_water, minimum=0, maximum=1
            ),
            max_backlog=env_int(env, "MAX_BACKLOG", d.max_backlog, minimum=1),
            backlog_retry_after_ms=env_int(
                env, "BACKLOG_RETRY_AFTER_MS", d.backlog_retry_after_ms, minimum=1
            ),
            tls_cert_file=security["tls_cert_file"],
            tls_key_file=security["tls_key_file"],
            tls_client_ca_file=security["tls_client_ca_file"],
            api_keys_file=security["api_keys_file"],
            metrics_addr=env_str(env, "METRICS_ADDR", d.metrics_addr),
            health_addr=env_str(env, "HEALTH_ADDR", d.health_addr),
            http_addr=env_str(env, "HTTP_ADDR", d.http_addr),
            trace=TraceSettings.from_env(env),
            payload_cipher=load_cipher(env_str(env, "PAYLOAD_KEY_FILE", "")),
        )

    def describe(self) -> str:
        """One log line, with secrets redacted."""
        return (
            f"gateway {self.gateway_id} on {self.listen_addr} redis={self.redis.describe()} "
            f"limits={self.max_texts_per_request} texts x {self.max_text_chars} chars "
            f"transport={self.transport()} auth={'api-keys' if self.api_keys_file else 'none'}"
        )

    def transport(self) -> str:
        """The gateway's transport: plaintext, tls or mtls."""
        if not self.tls_cert_file:
            return "plaintext"
        return "mtls" if self.tls_client_ca_file else "tls"


def _security_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The TLS and API-key settings, checked for consistency."""
    values = {
        "tls_cert_file": env_str(env, "TLS_CERT_FILE", ""),
        "tls_key_file": env_str(env, "TLS_KEY_FILE", ""),
        "tls_client_ca_file": env_str(env, "TLS_CLIENT_CA_FILE", ""),
        "api_keys_file": env_str(env, "API_KEYS_FILE", ""),
    }
    if bool(values["tls_cert_file"]) != bool(values["tls_key_file"]):
        raise SettingsError("set both TASKMUX_TLS_CERT_FILE and TASKMUX_TLS_KEY_FILE, or neither")
    if values["tls_client_ca_file"] and not values["tls_cert_file"]:
        raise SettingsError("TASKMUX_TLS_CLIENT_CA_FILE (mutual TLS) needs TASKMUX_TLS_CERT_FILE")
    return values


def settings_from_environ() -> GatewaySettings:
    """Settings from this process's environment."""
    return GatewaySettings.from_env(os.environ)
