"""The OpenAI-compatible HTTP API (aiohttp), on TASKMUX_HTTP_ADDR beside the gRPC port.

A POST /v1/embeddings is a gRPC Embed by another road: its body becomes an EmbedRequest
that runs through the gRPC server's own handler stack (gateway/handlers.py: metrics and
access log, server span, statuses, API keys) around the servicer's own Embed, so it gets
the same validation, limits, tenant charges, deadline, errors and counting, named
rpc "OpenAI.Embeddings". `HttpCall` stands in for the gRPC servicer context: it carries
the `Authorization` header as the metadata the API-key layer reads, and turns the
statuses layer's abort into `CallEnded`, which becomes OpenAI's error body. A body that
cannot be served enters the stack as `Unservable` (gateway/openai_api.py), so the caller
is authenticated before hearing what is wrong with it. GET /v1/models runs through the
same stack (rpc "OpenAI.Models"): any valid key may list the models. The same TLS files
as the gRPC port. JSON in and out is gateway/openai_api.py.

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

from gateway.auth import AUTH_METADATA
from gateway.catalog import CatalogWatcher
from gateway.errors import RETRY_AFTER_METADATA, Metadata, TaskmuxError, is_metadata_safe
from gateway.handlers import Layer, stacked
from gateway.openai_api import (
    EmbeddingsRequest,
    Unservable,
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
from taskmux.config import SettingsError

log = logging.getLogger(__name__)

EMBEDDINGS_RPC = "OpenAI.Embeddings"  # the rpc label of these calls in metrics, logs and spans
MODELS_RPC = "OpenAI.Models"
REQUEST_ID_HEADER = "X-Request-Id"
Ctx = grpc.aio.ServicerContext[Any, Any]
_METHODS = pb.DESCRIPTOR.services_by_name["TaskMux"].methods_by_name


class CallEnded(Exception):
    """An HTTP call ended with a non-OK status, by the statuses layer's `HttpCall.abort`."""

    def __init__(self, code: grpc.StatusCode, message: str, metadata: Metadata) -> None:
        super().__init__(message)
        self.code, self.message, self.metadata = code, message, metadata

    def error(self) -> TaskmuxError | None:
        """The gateway's error the call ended with, for OpenAI's `param`: the statuses
        layer aborts while handling it, so it is this exception's context."""
        cause = self.__context__
        return cause if isinstance(cause, TaskmuxError) and cause.code == self.code else None


class HttpCall:
    """What the handler stack and the servicer use of a gRPC servicer context, for one
    HTTP call: invocation_metadata (API keys), set_trailing_metadata and abort
    (statuses), code and cancelled (metrics and tracing), time_remaining (the servicer)."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> Metadata:
        authorization = self._request.headers.get("Authorization")
        return () if authorization is None else ((AUTH_METADATA, authorization),)

    def time_remaining(self) -> float | None:
        return None  # no deadline: the dispatcher applies the default timeout

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        pass  # its one entry, x-request-id, is the X-Request-Id response header

    async def abort(self, code: grpc.StatusCode, details: str, metadata: Metadata = ()) -> NoReturn:
        self._code = code
        raise CallEnded(code, details, metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def cancelled(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    def as_context(self) -> Ctx:
        """This call where the stack wants a gRPC context (see the class docstring)."""
        return cast(Ctx, self)


@dataclass(frozen=True)
class Reply:
    """How an embeddings call's EmbedResponse is written back."""

    model: str
    encoding_format: str

    def body(self, response: pb.EmbedResponse) -> dict[str, Any]:
        return embeddings_body(response, self.model, self.encoding_format)


NO_REPLY = Reply("", "float")  # an Unservable call always ends in its error


@dataclass(frozen=True)
class ModelsQuery:
    """A GET /v1/models (`model` "") or /v1/models/{model}, as the handler stack's request."""

    model: str


class OpenAIEmbeddings:
    """The endpoint's handlers: the servicer's Embed inside the gRPC server's layers."""

    def __init__(
        self, service: TaskMuxService, watcher: CatalogWatcher, layers: list[Layer]
    ) -> None:
        self._watcher = watcher
        self._embed = stacked(
            _METHODS["Embed"], service.method("Embed"), layers, rpc=EMBEDDINGS_RPC
        )
        # Unary and without heads, as ListTasks: any key that authenticates may list.
        self._models = stacked(_METHODS["ListTasks"], self._list_models, layers, rpc=MODELS_RPC)

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
        embed, reply = self._embed_request(await request.read(), request_id)
        try:
            response = await self._embed(embed, HttpCall(request).as_context())
        except CallEnded as end:
            return _error(end, headers)
        return web.json_response(reply.body(response), headers=headers)

    def _embed_request(self, body: bytes, request_id: str) -> tuple[object, Reply]:
        """The Embed request a body stands for and how to write its reply; `Unservable`
        with its error for a body that cannot be served."""
        try:
            parsed = parse_embeddings(body)
            encoder = resolve_model(parsed, self._watcher.catalog)
        except TaskmuxError as err:
            return Unservable(pb.EmbedRequest.DESCRIPTOR.full_name, err, request_id), NO_REPLY
        embed = pb.EmbedRequest(texts=parsed.texts, request_id=request_id)
        return embed, Reply(encoder.name, parsed.encoding_format)

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models."""
        return await self._answer_models(ModelsQuery(""), request)

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}."""
        return await self._answer_models(ModelsQuery(request.match_info["model"]), request)

    async def _answer_models(self, query: ModelsQuery, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self._models(query, HttpCall(request).as_context()))
        except CallEnded as end:
            return _error(end)

    async def _list_models(self, query: ModelsQuery, context: Ctx) -> dict[str, Any]:
        if not query.model:
            return models_body(served_encoder(self._watcher.catalog))
        named = EmbeddingsRequest([], query.model, "float", None)
        return model_body(resolve_model(named, self._watcher.catalog))


def _error(end: CallEnded, headers: dict[str, str] | None = None) -> web.Response:
    status, body = error_body(end.code, end.message, end.error())
    headers = dict(headers or {})
    retry_after_ms = dict(end.metadata).get(RETRY_AFTER_METADATA)
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
