"""The OpenAI-compatible HTTP API (aiohttp), on TASKMUX_HTTP_ADDR beside the gRPC port.

A POST /v1/embeddings is a gRPC Embed by another road: its body becomes an EmbedRequest
that goes to the servicer's own `Embed` (the same validation, limits, tenant charges,
idempotency-free dispatch, deadline and errors), under the same API keys (`Authorization:
Bearer <key>`, the keys file of gateway/auth.py, the embedding head's permission) and the
same TLS files as the gRPC port. `HttpCall` stands in for the gRPC servicer context, so
the servicer's error decorator, the request metrics (rpc "OpenAI.Embeddings") and the
server span see an HTTP call as they see a gRPC one. JSON in and out is gateway/openai_api.py.

Calls carry no deadline of their own: each gets TASKMUX_DEFAULT_TIMEOUT_MS. A client that
disconnects cancels its call, as a cancelled gRPC call does. On drain the port stops
accepting, and calls in flight get the drain timeout to finish.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc
from aiohttp import web
from taskmux_api.v1 import taskmux_pb2 as pb

from gateway.auth import KeysFile, Tenant, authenticate_http, calling_as
from gateway.catalog import CatalogWatcher
from gateway.errors import (
    RETRY_AFTER_METADATA,
    InvalidArgument,
    Metadata,
    TaskmuxError,
    is_metadata_safe,
)
from gateway.metrics import GatewayMetrics
from gateway.openai_api import (
    EmbeddingsRequest,
    embedding_head,
    embeddings_body,
    error_body,
    model_body,
    models_body,
    parse_embeddings,
    resolve_model,
    served_encoder,
)
from gateway.service import TaskMuxService
from gateway.settings import GatewaySettings
from gateway.tracing import traced
from taskmux.config import SettingsError
from taskmux.tracing import Tracing

log = logging.getLogger(__name__)

RPC = "OpenAI.Embeddings"  # the rpc label of these calls in metrics, logs and spans
REQUEST_ID_HEADER = "X-Request-Id"
Ctx = grpc.aio.ServicerContext[Any, Any]


class CallEnded(Exception):
    """An HTTP call ended with a non-OK status, by `HttpCall.abort` or `HttpCall.fail`."""

    def __init__(
        self, code: grpc.StatusCode, message: str, metadata: Metadata, error: TaskmuxError | None
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.metadata, self.error = code, message, metadata, error


class HttpCall:
    """What the servicer and its wrappers use of a gRPC servicer context, for one HTTP call:
    time_remaining and abort (the servicer), set_trailing_metadata (its error decorator),
    code and cancelled (metrics and tracing)."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return None  # no deadline: the dispatcher applies the default timeout

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        pass  # its one entry, x-request-id, is the X-Request-Id response header

    async def abort(self, code: grpc.StatusCode, details: str, metadata: Metadata = ()) -> NoReturn:
        self._code = code
        raise CallEnded(code, details, metadata, None)

    def fail(self, error: TaskmuxError) -> NoReturn:
        """End the call with `error`, keeping it for the OpenAI body (its `param`)."""
        self._code = error.code
        raise CallEnded(error.code, error.message, error.trailing_metadata(), error)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def cancelled(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    def as_context(self) -> Ctx:
        """This call where the servicer's API wants a gRPC context (see the class docstring)."""
        return cast(Ctx, self)


@dataclass(frozen=True)
class EmbeddingsCall:
    """A POST /v1/embeddings as the metrics and tracing wrappers see a request."""

    body: bytes
    request_id: str  # the X-Request-Id header: the log context's request_id


Handler = Callable[[EmbeddingsCall, HttpCall], Awaitable[dict[str, Any]]]


class OpenAIEmbeddings:
    """The endpoint's handlers, on top of the gRPC servicer."""

    def __init__(
        self,
        service: TaskMuxService,
        watcher: CatalogWatcher,
        keys: KeysFile | None,
        metrics: GatewayMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._service = service
        self._watcher = watcher
        self._keys = keys
        # The wrappers server.add_service puts around each gRPC method, in the same order.
        embed: Any = self._embed
        if metrics is not None:
            embed = metrics.instrument(RPC, embed, streaming=False)
        if tracing is not None:
            embed = traced(tracing, RPC, embed, streaming=False)
        self._embed_call: Handler = embed

    def app(self, *, max_body_bytes: int) -> web.Application:
        """The aiohttp application: the routes, and OpenAI error bodies for HTTP errors."""
        app = web.Application(client_max_size=max_body_bytes, middlewares=[_http_errors])
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        return app

    async def embeddings(self, request: web.Request) -> web.Response:
        """POST /v1/embeddings."""
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        headers = {REQUEST_ID_HEADER: request_id} if is_metadata_safe(request_id) else {}
        try:
            tenant = self._authenticate(request, [embedding_head()])
            call = EmbeddingsCall(await request.read(), request_id)
            with calling_as(tenant):
                body = await self._embed_call(call, HttpCall(request))
        except TaskmuxError as err:  # authentication, before the call is counted
            return _error(err.code, err.message, err.trailing_metadata(), err, headers)
        except CallEnded as end:
            return _error(end.code, end.message, end.metadata, end.error, headers)
        return web.json_response(body, headers=headers)

    async def _embed(self, request: EmbeddingsCall, call: HttpCall) -> dict[str, Any]:
        """The counted, traced part of a call: check the OpenAI fields, then Embed."""
        try:
            if request.request_id and not is_metadata_safe(request.request_id):
                raise InvalidArgument(f"{REQUEST_ID_HEADER} must be 1-128 printable ASCII")
            parsed = parse_embeddings(request.body)
            encoder = resolve_model(parsed, self._watcher.catalog)
        except TaskmuxError as err:
            call.fail(err)
        embed = pb.EmbedRequest(texts=parsed.texts, request_id=request.request_id)
        response = await self._service.Embed(embed, call.as_context())
        return embeddings_body(response, encoder.name, parsed.encoding_format)

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models."""
        try:
            self._authenticate(request, [])
            return web.json_response(models_body(served_encoder(self._watcher.catalog)))
        except TaskmuxError as err:
            return _error(err.code, err.message, err.trailing_metadata(), err)

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}."""
        try:
            self._authenticate(request, [])
            name = request.match_info["model"]
            parsed = EmbeddingsRequest([], name, "float", None)
            return web.json_response(model_body(resolve_model(parsed, self._watcher.catalog)))
        except TaskmuxError as err:
            return _error(err.code, err.message, err.trailing_metadata(), err)

    def _authenticate(self, request: web.Request, heads: list[str]) -> Tenant | None:
        if self._keys is None:
            return None
        return authenticate_http(self._keys, request.headers.get("Authorization"), heads)


def _error(
    code: grpc.StatusCode,
    message: str,
    metadata: Metadata,
    error: TaskmuxError | None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    status, body = error_body(code, message, error)
    headers = dict(headers or {})
    retry_after_ms = dict(metadata).get(RETRY_AFTER_METADATA)
    if isinstance(retry_after_ms, str):
        # Retry-After is whole seconds; the OpenAI client reads retry-after-ms first.
        headers["Retry-After"] = str(max(1, math.ceil(int(retry_after_ms) / 1000)))
        headers["retry-after-ms"] = retry_after_ms
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(body, status=status, headers=headers)


# The gRPC status whose OpenAI error type best fits each HTTP error aiohttp raises itself.
_HTTP_ERROR_CODES = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
}


@web.middleware
async def _http_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (unknown path, wrong method, body too big) as OpenAI bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_ERROR_CODES.get(exc.status, grpc.StatusCode.UNKNOWN)
        _, body = error_body(code, f"{request.method} {request.path}: {exc.reason}")
        return web.json_response(body, status=exc.status, headers=_allow(exc))


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


class OpenAIHttp:
    """The HTTP server: bound and serving on enter, drained by `drain` (and on exit).

    Serves nothing when settings.http_addr is "" (then `port` is 0)."""

    def __init__(self, settings: GatewaySettings, endpoint: OpenAIEmbeddings) -> None:
        self._settings = settings
        self._endpoint = endpoint
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> OpenAIHttp:
        s = self._settings
        if not s.http_addr:
            return self
        host, port = _split(s.http_addr)
        runner = web.AppRunner(
            self._endpoint.app(max_body_bytes=s.max_message_bytes),
            handler_cancellation=True,  # a client that hangs up cancels its call
            access_log=None,  # metrics.py writes the access log of embeddings calls
            shutdown_timeout=s.drain_timeout_s,
        )
        await runner.setup()
        self._runner = runner
        # SO_REUSEPORT as grpcio binds: `taskmux up` runs several gateways on one port.
        site = web.TCPSite(
            runner,
            host,
            port,
            ssl_context=_ssl_context(s),
            reuse_port=hasattr(socket, "SO_REUSEPORT") or None,
        )
        await site.start()
        self.port = int(runner.addresses[0][1])
        scheme = "https" if s.tls_cert_file else "http"
        log.info("OpenAI-compatible API on %s://%s:%d/v1", scheme, host, self.port)
        return self

    async def drain(self) -> None:
        """Stop accepting; let calls in flight finish within the drain timeout."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise SettingsError(f"TASKMUX_HTTP_ADDR {addr!r} must be host:port")
    # Every interface when the address names none, as for the metrics port.
    return host.strip("[]") or "0.0.0.0", int(port)  # nosec B104


def _ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The gRPC port's TLS (mutual TLS with a client CA) for the HTTP port; None without.

    Read once at start: unlike the gRPC port, a rotated certificate needs a restart."""
    if not settings.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        if settings.tls_client_ca_file:
            context.load_verify_locations(settings.tls_client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as err:
        raise SettingsError(f"TLS files for the HTTP port: {err}") from None
    return context
