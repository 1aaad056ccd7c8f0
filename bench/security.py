"""What security and observability cost per call: Embed of one short text through four
gateway configurations, measured side by side in one run (`python -m bench.run --only
security` runs just this part).

    a  plaintext, no API keys                       (the baseline: `make run`)
    b  TLS + an API key, tenant without limits      (handshake, record layer, key lookup)
    c  b + a rate limit and a quota that never bite (one Lua script in Redis per call)
    d  c + tracing in gateway and worker, every call sampled, console exporter

Each configuration is a whole system of its own (its Valkey, worker and gateway), all four
started together and left idle while another is measured. Runs are interleaved in rounds,
each round rotating which configuration goes first, so drift on a shared, noisy machine
lands on all four alike. Connections (and so TLS handshakes) are opened in each run's
warm-up: the figures are the steady cost of a call on an open connection.

Tracing exports through the console exporter into a file: the same SDK path as OTLP (span
objects, the batch processor, serialization on its thread), but JSON to a file instead of
protobuf to a collector. An OTLP exporter aimed at nothing would fail its exports and so
measure less than a working one; no collector runs on this machine.
"""

from __future__ import annotations

import json
import secrets
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
from taskmux_client.channel import TLSConfig

from bench.system import load, running_system, valkey
from gateway.auth import hash_key
from router import keys
from taskmux.clientargs import ClientSecurity
from taskmux.devcerts import issue, pem
from taskmux.loadtest.report import LoadReport
from taskmux.loadtest.stats import LatencySummary, summarize

TENANT = "bench"
WORDS = "6"  # one short text: about 8 tokens
THROUGHPUT_CONCURRENCY = 8
# Far above what two cores can send, so the limiter runs its whole script and never
# refuses; the burst keeps the rate key alive (its TTL) for 100 s after the last call.
LIMITS = {"rate_per_s": 1000, "burst": 100_000, "quota_units": 10**12, "quota_window_s": 86_400}
GATEWAY_SPAN = '"name": "taskmux.v1.TaskMux/Embed"'
WORKER_SPAN = '"name": "job embed"'


@dataclass(frozen=True)
class Variant:
    """One gateway configuration."""

    name: str
    adds: str  # for the report: what it adds to the one before
    secure: bool = False  # TLS and an API key
    limits: bool = False
    tracing: bool = False


VARIANTS = (
    Variant("a", "plaintext, no API keys (baseline)"),
    Variant("b", "TLS + API key (tenant without limits)", secure=True),
    Variant("c", "b + rate limit and quota (one Lua script in Redis)", secure=True, limits=True),
    Variant("d", "c + tracing, console exporter", secure=True, limits=True, tracing=True),
)


@dataclass(frozen=True)
class Secrets:
    """A fresh CA, server certificate and API key, written into `dir` for the gateways."""

    dir: Path
    ca: bytes
    api_key: str = field(repr=False)

    @classmethod
    def create(cls, directory: Path) -> Secrets:
        ca = issue("taskmux bench CA", None, ca=True)
        server = pem(issue("localhost", ca, server=True))
        (directory / "server.pem").write_bytes(server.cert)
        (directory / "server.key").write_bytes(server.key)
        api_key = secrets.token_urlsafe(32)
        for name, limits in (("keys.json", {}), ("keys-limited.json", LIMITS)):
            tenant = {"key_sha256": hash_key(api_key), **limits}
            (directory / name).write_text(json.dumps({"tenants": {TENANT: tenant}}))
        return cls(directory, pem(ca).cert, api_key)

    def env(self, variant: Variant) -> dict[str, str]:
        """What the gateway (and worker) of `variant` are started with."""
        if not variant.secure:
            return {}
        keys_file = "keys-limited.json" if variant.limits else "keys.json"
        env = {
            "TASKMUX_TLS_CERT_FILE": str(self.dir / "server.pem"),
            "TASKMUX_TLS_KEY_FILE": str(self.dir / "server.key"),
            "TASKMUX_API_KEYS_FILE": str(self.dir / keys_file),
        }
        if variant.tracing:
            env["TASKMUX_TRACE_EXPORTER"] = "console"
        return env

    def client(self, variant: Variant) -> ClientSecurity:
        """What a client of `variant` needs."""
        if not variant.secure:
            return ClientSecurity()
        return ClientSecurity(api_key=self.api_key, tls=TLSConfig(root_certificates=self.ca))


@dataclass(frozen=True)
class Deployment:
    """One running configuration."""

    variant: Variant
    target: str
    redis_url: str
    security: ClientSecurity
    spans: Path  # the processes' stdout: where the console exporter writes


@contextmanager
def deployments(repo: Path, logs: Path, work: Path) -> Iterator[list[Deployment]]:
    """Every variant running at once; certificates, keys and span files under `work`."""
    found = Secrets.create(work)
    with ExitStack() as stack:
        running = []
        for variant in VARIANTS:
            url = stack.enter_context(valkey(work / f"valkey-{variant.name}"))
            security = found.client(variant)
            spans = work / f"stdout-{variant.name}.txt"
            target, _ = stack.enter_context(
                running_system(
                    repo,
                    logs / f"security-{variant.name}.log",
                    env={"TASKMUX_REDIS_URL": url, **found.env(variant)},
                    security=security,
                    stdout=spans,
                )
            )
            running.append(Deployment(variant, target, url, security, spans))
        yield running


@dataclass
class SecurityRuns:
    """Every run of every variant, one per round, at c=1 and at THROUGHPUT_CONCURRENCY."""

    rounds: int
    duration_s: float
    latency: dict[str, list[LoadReport]] = field(default_factory=dict)
    throughput: dict[str, list[LoadReport]] = field(default_factory=dict)
    charged_units: dict[str, int] = field(default_factory=dict)  # limiter's quota `used`
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # (gateway, worker)


def measure(
    running: Sequence[Deployment], rounds: int, duration_s: float, warmup_s: float
) -> SecurityRuns:
    """`rounds` rounds; in each, every variant at c=1, then every one at c=8."""
    runs = SecurityRuns(rounds, duration_s)
    for r in range(rounds):
        order = [*running[r % len(running) :], *running[: r % len(running)]]
        for concurrency, into in ((1, runs.latency), (THROUGHPUT_CONCURRENCY, runs.throughput)):
            # A throughput is a mean and settles sooner than a p99.
            duration = duration_s if concurrency == 1 else duration_s / 2
            for d in order:
                print(
                    f"bench: security {d.variant.name}, round {r + 1}, c={concurrency}",
                    file=sys.stderr,
                )
                report = load(d.target, "embed", concurrency, WORDS, duration, warmup_s, d.security)
                into.setdefault(d.variant.name, []).append(report)
    return runs


def charged_units(redis_url: str) -> int:
    """Text units the limiter charged to the bench tenant (0: it never ran)."""
    with redis.Redis.from_url(redis_url) as client:
        used = client.hget(keys.tenant_quota(TENANT), "used")
    return int(used or 0)


def exported_spans(path: Path) -> tuple[int, int]:
    """(gateway Embed spans, worker job spans) the console exporter wrote to `path`."""
    gateway = worker = 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            gateway += GATEWAY_SPAN in line
            worker += WORKER_SPAN in line
    return gateway, worker


def run_security(
    repo: Path, logs: Path, rounds: int, duration_s: float, warmup_s: float
) -> SecurityRuns:
    """Start the four variants, measure them, and gather what shows each did its work."""
    with tempfile.TemporaryDirectory(prefix="taskmux-bench-") as tmp:
        work = Path(tmp)
        with deployments(repo, logs, work) as running:
            runs = measure(running, rounds, duration_s, warmup_s)
            for d in running:
                if d.variant.limits:
                    runs.charged_units[d.variant.name] = charged_units(d.redis_url)
        # Counted once the processes are gone: they flush their last spans on exit.
        for d in running:
            if d.variant.tracing:
                runs.spans[d.variant.name] = exported_spans(d.spans)
    return runs


@dataclass(frozen=True)
class VariantFigures:
    """One variant over every round: latencies pooled, throughput the median."""

    latency: LatencySummary  # c=1, successful calls of every round
    texts_per_s: float  # median over rounds at THROUGHPUT_CONCURRENCY
    calls: int  # measured calls, both concurrencies
    errors: int
    p50_by_round: tuple[float, ...]


def figures(runs: SecurityRuns, name: str) -> VariantFigures:
    """The figures of variant `name`."""
    latency_runs, throughput_runs = runs.latency[name], runs.throughput[name]
    pooled = np.concatenate(
        [r.samples.latency_s[r.samples.ok & r.samples.measured] for r in latency_runs]
    )
    both = [*latency_runs, *throughput_runs]
    return VariantFigures(
        latency=summarize(pooled),
        texts_per_s=statistics.median(r.texts_per_s for r in throughput_runs),
        calls=sum(r.sent for r in both),
        errors=sum(r.errors for r in both),
        p50_by_round=tuple(r.latency_ok.p50_ms or float("nan") for r in latency_runs),
    )
