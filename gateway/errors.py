"""The gateway's errors, and the one place where they become gRPC statuses.

    TaskmuxError                 (abstract; carries a gRPC status code)
    ├── InvalidArgument          INVALID_ARGUMENT: fix the request
    ├── NotFound                 NOT_FOUND: no such head
    ├── DeadlineExceeded         DEADLINE_EXCEEDED: no result in time
    ├── Unavailable              UNAVAILABLE: Redis or workers unreachable; retry
    ├── ResourceExhausted        RESOURCE_EXHAUSTED: a full queue, Redis near or at its
    │                            memory limit, or a tenant over its rate or quota; retry
    │                            after the hint (none: not retryable)
    ├── Unauthenticated          UNAUTHENTICATED: no API key, or an unknown one
    ├── PermissionDenied         PERMISSION_DENIED: the tenant may not use that head
    ├── WorkerError              whatever status a worker answered with
    └── Internal                 INTERNAL: a bug; a fixed message with a log reference

Redis errors become one of these in one place, `redis_errors` (`from_redis`): out of
memory is RESOURCE_EXHAUSTED with a retry hint, anything else UNAVAILABLE.

Every TaskMux call, unary or streaming, runs inside `statuses` (one layer of the handler
stack, gateway/handlers.py): the one place where an exception becomes the call's status.
A Pipeline task's in-band error is built by the same `as_status`.

A request whose bytes do not parse (invalid UTF-8 in a string field, a truncated or
foreign message) reaches its handler as `Undecodable` (see `deferred_decode`) and is
answered INVALID_ARGUMENT here, instead of the INTERNAL that grpcio sends when its
deserializer raises.

Anything else raised in a handler is a bug: the client gets INTERNAL with a fixed
message and a reference, and the traceback is logged under that reference (`Internal`).

Every status carries the request's `request_id`, when it has one, in the trailing
metadata entry `x-request-id`.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from redis.exceptions import OutOfMemoryError, RedisError

if TYPE_CHECKING:
    from gateway.handlers import Call

log = logging.getLogger(__name__)

REQUEST_ID_METADATA = "x-request-id"
RETRY_AFTER_METADATA = "retry-after-ms"
STATUS_DETAILS_METADATA = "grpc-status-details-bin"

# Retry hint when Redis is at or near its memory limit: long enough for replies to be read,
# jobs acknowledged and idempotency records to expire, and for the memory guard
# (gateway/memory.py) to read INFO again.
REDIS_MEMORY_RETRY_AFTER_MS = 1000

# request_id and idempotency_key: printable ASCII, so they are valid gRPC metadata values.
META_MAX_CHARS = 128

Metadata = tuple[tuple[str, str | bytes], ...]


class TaskmuxError(Exception):
    """A failure the client should hear about, with its status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def trailing_metadata(self) -> Metadata:
        """Extra trailing metadata for this status (none by default)."""
        return ()


class InvalidArgument(TaskmuxError):
    """The request breaks a documented rule."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TaskmuxError):
    """The request names a head the deployment does not serve."""

    code = grpc.StatusCode.NOT_FOUND


class DeadlineExceeded(TaskmuxError):
    """No result arrived before the deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(TaskmuxError):
    """The queue is unreachable or nothing can serve the request yet; retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(TaskmuxError):
    """A queue is full or a tenant is over a limit; retry after `retry_after_ms`.

    `retry_after_ms` 0 sends no hint: waiting would not help (a request bigger than a
    whole quota), so clients that retry only on a hint do not retry.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def trailing_metadata(self) -> Metadata:
        """A `google.rpc.RetryInfo` in the rich status, and `retry-after-ms` for plain clients."""
        if self.retry_after_ms <= 0:
            return ()
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(self.retry_after_ms)
        detail = any_pb2.Any()
        detail.Pack(RetryInfo(retry_delay=delay))
        status = Status(code=self.code.value[0], message=self.message, details=[detail])
        return (
            (STATUS_DETAILS_METADATA, status.SerializeToString()),
            (RETRY_AFTER_METADATA, str(self.retry_after_ms)),
        )


class Unauthenticated(TaskmuxError):
    """The call carries no API key, or one that maps to no tenant."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TaskmuxError):
    """The caller's tenant is not allowed to use a head the request names."""

    code = grpc.StatusCode.PERMISSION_DENIED


class WorkerError(TaskmuxError):
    """A worker answered with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Internal(TaskmuxError):
    """An unexpected exception: its traceback is logged, never sent (see `as_status`)."""

    code = grpc.StatusCode.INTERNAL


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Raise a failed Redis command of `what` ("the task queue", say) as `from_redis`'s error."""
    try:
        yield
    except RedisError as err:
        raise from_redis(err, what) from err


def from_redis(err: RedisError, what: str) -> TaskmuxError:
    """The error for a failed Redis command of `what` ("the task queue", say): Redis out
    of memory (maxmemory reached, noeviction) is RESOURCE_EXHAUSTED with a retry hint,
    since it clears as results are read and records expire; anything else UNAVAILABLE."""
    if isinstance(err, OutOfMemoryError):
        return ResourceExhausted(
            f"{what} (Redis) is at its memory limit and refuses writes; retry after "
            f"{REDIS_MEMORY_RETRY_AFTER_MS} ms",
            retry_after_ms=REDIS_MEMORY_RETRY_AFTER_MS,
        )
    return Unavailable(f"{what} (Redis) is unreachable ({type(err).__name__}); retry")


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def worker_error(code: int, message: str) -> TaskmuxError:
    """The error for a worker's reply code (an unknown code counts as INTERNAL)."""
    return WorkerError(_CODES.get(code, grpc.StatusCode.INTERNAL), message or "worker failed")


@dataclass(frozen=True)
class Undecodable:
    """What a handler receives instead of a request whose bytes did not parse."""

    type_name: str

    def error(self) -> TaskmuxError:
        """The status the caller gets for it."""
        return InvalidArgument(
            f"the request is not a valid {self.type_name}: a string field holds bytes that "
            "are not UTF-8, or the message is truncated or malformed"
        )


def deferred_decode(message_type: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A request deserializer that hands parse failures to the handler instead of raising."""
    name = message_type.DESCRIPTOR.full_name

    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(name)

    return decode


Ctx = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")


async def abort(context: Ctx, err: TaskmuxError, echo: Metadata = ()) -> NoReturn:
    """End the call with `err`'s status, message and trailers (a retry hint, say)."""
    await context.abort(err.code, err.message, echo + err.trailing_metadata())
    raise AssertionError("unreachable: context.abort raises")


def as_status(err: Exception, where: str, request: object = None) -> TaskmuxError:
    """The status for `err`, raised in `where`: its own for a TaskmuxError; otherwise
    INTERNAL with a fixed message, the traceback logged under its reference."""
    if isinstance(err, TaskmuxError):
        return err
    return Internal(internal_ref(where, request))


@contextlib.asynccontextmanager
async def statuses(call: Call) -> AsyncIterator[None]:
    """The handler-stack layer that ends a call with the status of what it raised."""
    echo = _echo_request_id(call.request, call.context)
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as err:
        await abort(call.context, as_status(err, call.rpc, call.request), echo)


def decoded(request: Req) -> Req:
    """`request`, if it parsed; the INVALID_ARGUMENT for it otherwise (see `deferred_decode`)."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


def internal_ref(where: str, request: object = None) -> str:
    """Log the current exception under a fresh reference; the message for the client."""
    ref = uuid.uuid4().hex[:12]
    request_id = getattr(request, "request_id", "")
    log.exception("internal error in %s (ref %s, request_id %r)", where, ref, request_id)
    return f"internal error (ref {ref})"


def _echo_request_id(request: object, context: Ctx) -> Metadata:
    """Set `x-request-id` on the call's trailers; the same entry for an abort to carry."""
    request_id = getattr(request, "request_id", "")
    if not isinstance(request_id, str) or not is_metadata_safe(request_id):
        return ()  # absent, or invalid: the handler answers INVALID_ARGUMENT
    echo: Metadata = ((REQUEST_ID_METADATA, request_id),)
    context.set_trailing_metadata(echo)
    return echo


def is_metadata_safe(value: str) -> bool:
    """True for 1 to META_MAX_CHARS printable ASCII characters (space to "~")."""
    return 0 < len(value) <= META_MAX_CHARS and all(" " <= c <= "~" for c in value)


# The HTTP status of each gRPC status, for the OpenAI-compatible HTTP endpoint
# (gateway/openai_http.py): the mapping of google.rpc.Code's documentation and grpc-gateway.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status that stands for gRPC status `code` (500 for one not in the table)."""
    return HTTP_STATUS.get(code, 500)
