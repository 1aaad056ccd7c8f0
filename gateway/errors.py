"""The gateway's errors, and the one place where they become gRPC statuses.

    TaskmuxError                 (abstract; carries a gRPC status code)
    ├── InvalidArgument          INVALID_ARGUMENT: fix the request
    ├── NotFound                 NOT_FOUND: no such head
    ├── DeadlineExceeded         DEADLINE_EXCEEDED: no result in time
    ├── Unavailable              UNAVAILABLE: Redis or workers unreachable; retry
    └── WorkerError              whatever status a worker answered with

Anything else raised in a handler is a bug: the client gets INTERNAL with a fixed
message and a reference, and the traceback is logged under that reference.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class TaskmuxError(Exception):
    """A failure the client should hear about, with its status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class WorkerError(TaskmuxError):
    """A worker answered with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def worker_error(code: int, message: str) -> TaskmuxError:
    """The error for a worker's reply code (an unknown code counts as INTERNAL)."""
    return WorkerError(_CODES.get(code, grpc.StatusCode.INTERNAL), message or "worker failed")


Svc = TypeVar("Svc")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Svc, Req, Ctx], Awaitable[Resp]]


def grpc_status(handler: Handler[Svc, Req, Resp]) -> Handler[Svc, Req, Resp]:
    """Turn a handler's TaskmuxError (or unexpected exception) into its gRPC status."""

    @functools.wraps(handler)
    async def wrapper(self: Svc, request: Req, context: Ctx) -> Resp:
        try:
            return await handler(self, request, context)
        except TaskmuxError as err:
            await context.abort(err.code, err.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (ref %s)", handler.__name__, ref)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


StreamHandler = Callable[[Svc, Req, Ctx], AsyncIterator[Resp]]


def grpc_status_stream(handler: StreamHandler[Svc, Req, Resp]) -> StreamHandler[Svc, Req, Resp]:
    """`grpc_status` for server-streaming handlers (async generators)."""

    @functools.wraps(handler)
    async def wrapper(self: Svc, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        try:
            async for item in handler(self, request, context):
                yield item
        except TaskmuxError as err:
            await context.abort(err.code, err.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (ref %s)", handler.__name__, ref)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")

    return wrapper


def internal_ref(where: str) -> str:
    """Log the current exception under a fresh reference; the message for the client."""
    ref = uuid.uuid4().hex[:12]
    log.exception("internal error in %s (ref %s)", where, ref)
    return f"internal error (ref {ref})"
