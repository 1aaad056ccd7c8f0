"""The gateway's Prometheus metrics: calls by rpc, head and status code, and their latency.

Labels stay bounded: `head` is a head the catalog serves, "" when the request names none,
or "unknown"; request ids and tenants are never labels.

Each finished call also writes an access-log line (rpc, status, milliseconds) carrying the
request id and tenant. Both sit outside authentication in the handler stack
(gateway/handlers.py): a refused key or head is counted and logged like any other status.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.handlers import Call
from taskmux.logs import log_context

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    """Counters and histograms of one gateway process, in their own registry."""

    def __init__(
        self, known_heads: Callable[[], Collection[str]], reconnects: Callable[[], int]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._known_heads = known_heads
        self.registry.register(_Reconnects(reconnects))
        self.requests = Counter(
            "taskmux_gateway_requests",
            "Finished calls by rpc, head and gRPC status code.",
            ("rpc", "head", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "taskmux_gateway_request_seconds",
            "End-to-end call latency, as the gateway sees it.",
            ("rpc",),
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    @contextlib.asynccontextmanager
    async def observe(self, call: Call) -> AsyncIterator[None]:
        """The handler-stack layer that counts and times the call, and logs its outcome."""
        start = time.perf_counter()
        returned = False
        with log_context(request_id=_request_id(call.request)):
            try:
                yield
                returned = True
            finally:
                self._observe(call, call.status(returned=returned), start)

    def _observe(self, call: Call, code: grpc.StatusCode, start: float) -> None:
        head = self._head(call.request)
        elapsed_s = time.perf_counter() - start
        self.requests.labels(call.rpc, head, code.name).inc()
        self.latency.labels(call.rpc).observe(elapsed_s)
        # The access log: failures at INFO, so they are seen by default; successes at
        # DEBUG, since a line per call costs real time at thousands of calls a second.
        # The tenant comes from the call: the API-key layer's log context, inside this
        # one, has ended by now.
        level = logging.DEBUG if code is grpc.StatusCode.OK else logging.INFO
        log.log(
            level,
            "%s %s %.1f ms",
            call.rpc,
            code.name,
            elapsed_s * 1000,
            extra={"head": head, "tenant": call.tenant},
        )

    def _head(self, request: Any) -> str:
        head = getattr(request, "head", "")
        if not isinstance(head, str) or not head:
            return ""
        return head if head in self._known_heads() else "unknown"


def _request_id(request: Any) -> str:
    request_id = getattr(request, "request_id", "")
    return request_id if isinstance(request_id, str) and len(request_id) <= 128 else ""


class _Reconnects(Collector):
    """Redis reconnects, read from the catalog watcher at scrape time."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(
            "taskmux_gateway_redis_reconnects",
            "Times this gateway found Redis reachable again after losing it.",
        )
        family.add_metric([], self._count())
        return [family]
