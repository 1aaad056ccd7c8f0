"""OpenTelemetry tracing: one TracerProvider per process, off unless an exporter is set.

A call's trace crosses processes inside the Redis stream entry: the gateway writes the
W3C `traceparent` of its enqueue span into each Job, and the worker continues the trace
from it (router/messages.py). Settings, read once in each process's `__main__`:

    TASKMUX_TRACE_EXPORTER       none (default: tracing off), otlp, or console (debugging)
    TASKMUX_TRACE_ENDPOINT       OTLP/gRPC collector, http://host:4317 (https:// for TLS)
    TASKMUX_TRACE_SAMPLE_RATIO   share of calls traced, 0 to 1; workers follow the gateway

Nothing here touches OpenTelemetry's global provider: `Tracing` builds its own when
entered and flushes and shuts it down on exit. Off, it has no provider at all, and every
method returns at once, so the request path pays an attribute check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from taskmux.config import SettingsError, env_float, env_str, redact_url

EXPORTERS: Final = ("none", "otlp", "console")
TRACEPARENT: Final = "traceparent"
# A span's export may wait this long at shutdown; a collector that is down must not hold
# up a process that was asked to stop.
EXPORT_TIMEOUT_MS: Final = 5_000

_PROPAGATOR: Final = TraceContextTextMapPropagator()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceSettings:
    """Where spans go, and how many calls are traced."""

    # "none" turns tracing off; "otlp" sends spans to `endpoint`; "console" prints them.
    exporter: str = "none"
    # OTLP/gRPC collector URL; point it at the collector (or agent) of your cluster.
    endpoint: str = "http://127.0.0.1:4317"
    # Share of calls traced; lower it when the collector or the overhead is too much.
    sample_ratio: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TraceSettings:
        """Settings from the environment; unset variables take the defaults above."""
        d = cls()
        exporter = env_str(env, "TRACE_EXPORTER", d.exporter).lower()
        if exporter not in EXPORTERS:
            raise SettingsError(f"TASKMUX_TRACE_EXPORTER={exporter!r} is not one of {EXPORTERS}")
        endpoint = env_str(env, "TRACE_ENDPOINT", d.endpoint)
        if not endpoint.startswith(("http://", "https://")):
            raise SettingsError(f"TASKMUX_TRACE_ENDPOINT={endpoint!r} needs http:// or https://")
        ratio = env_float(env, "TRACE_SAMPLE_RATIO", d.sample_ratio, minimum=0.0, maximum=1.0)
        return cls(exporter=exporter, endpoint=endpoint, sample_ratio=ratio)

    def describe(self) -> str:
        """A few words for the start-up log line."""
        if self.exporter == "none":
            return "tracing=off"
        where = f" to {redact_url(self.endpoint)}" if self.exporter == "otlp" else ""
        return f"tracing={self.exporter}{where} ratio={self.sample_ratio:g}"


class Tracing:
    """One process's tracer: spans are recorded while entered; exit flushes them.

    `exporter` replaces the one the settings name (tests pass an in-memory one) and
    turns tracing on whatever the settings say.
    """

    def __init__(
        self,
        settings: TraceSettings | None = None,
        *,
        service: str = "taskmux",
        instance: str = "",
        exporter: SpanExporter | None = None,
    ) -> None:
        self._settings = settings or TraceSettings()
        self._service = service
        self._instance = instance
        self._exporter = exporter
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None

    @property
    def enabled(self) -> bool:
        """True while spans are being recorded."""
        return self._tracer is not None

    def __enter__(self) -> Tracing:
        exporter = self._exporter or _exporter(self._settings)
        if exporter is None:
            return self
        attributes = {"service.name": self._service}
        if self._instance:
            attributes["service.instance.id"] = self._instance
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(self._settings.sample_ratio)),
            resource=Resource(attributes),
            shutdown_on_exit=False,  # __exit__ does it, in order with everything else
        )
        # Batched and bounded: spans are exported off the request path, and dropped
        # rather than queued without limit when the collector falls behind.
        processor = BatchSpanProcessor(exporter, export_timeout_millis=EXPORT_TIMEOUT_MS)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("taskmux")
        log.info("%s", "tracing=custom exporter" if self._exporter else self._settings.describe())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            provider.shutdown()  # flushes what is still queued

    def start_span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        parent: Context | None = None,
        start_ns: int | None = None,
        attributes: Attributes = None,
    ) -> Span:
        """A started span (end it yourself), child of `parent` or of the current span.

        Exceptions are never recorded: their messages may quote requests. Callers set
        the status from the gRPC code instead.
        """
        if self._tracer is None:
            return INVALID_SPAN
        return self._tracer.start_span(
            name,
            context=parent,
            kind=kind,
            attributes=attributes,
            start_time=start_ns,
            record_exception=False,
            set_status_on_exception=False,
        )

    def traceparent(self, span: Span) -> str:
        """The W3C traceparent of `span`, for a stream entry; "" when off."""
        if self._tracer is None or not span.get_span_context().is_valid:
            return ""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get(TRACEPARENT, "")


def parent_context(traceparent: str) -> Context:
    """The context a stream entry's traceparent names; a new root when it is "" or invalid."""
    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({TRACEPARENT: traceparent}, context=Context())


def status_of(span: Span, code: int, name: str) -> None:
    """Record a gRPC status code on `span`; anything but OK marks it as an error."""
    span.set_attribute("rpc.grpc.status_code", code)
    if code != 0:
        span.set_status(trace.Status(trace.StatusCode.ERROR, name))


def _exporter(settings: TraceSettings) -> SpanExporter | None:
    if settings.exporter == "console":
        return ConsoleSpanExporter()
    if settings.exporter == "otlp":
        # Imported only when asked for: it brings its own gRPC stubs and protobufs.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.endpoint, timeout=EXPORT_TIMEOUT_MS / 1000)
    return None
