"""What a failed call raises: one exception per status code a caller may handle.

TaskMuxError                 (any non-OK status; also a grpc.RpcError)
├── InvalidArgumentError     INVALID_ARGUMENT: fix the request
├── NotFoundError            NOT_FOUND: the head is not served
├── UnauthenticatedError     UNAUTHENTICATED: a missing, malformed or unknown API key
├── PermissionDeniedError    PERMISSION_DENIED: the key's tenant may not use the head
├── DeadlineExceededError    DEADLINE_EXCEEDED: no result in time
├── UnavailableError         UNAVAILABLE: still failing after the retries
├── ResourceExhaustedError   RESOURCE_EXHAUSTED: a full queue after the retries,
│                            or a message over the server's size limit
└── InternalError            INTERNAL: a server bug; the message has a log reference
"""

from __future__ import annotations

import grpc


class TaskMuxError(grpc.RpcError):
    """A call that ended with a non-OK status, after any retries."""

    def __init__(
        self,
        status: grpc.StatusCode,
        message: str,
        *,
        request_id: str = "",
        attempts: int = 1,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message
        self.request_id = request_id
        self.attempts = attempts
        self.retry_after_s = retry_after_s

    def code(self) -> grpc.StatusCode:
        """The status code, as grpc.Call.code() gives it."""
        return self.status

    def details(self) -> str:
        """The server's message, as grpc.Call.details() gives it."""
        return self.message


class InvalidArgumentError(TaskMuxError):
    """The request breaks a documented rule; the message names the field."""


class NotFoundError(TaskMuxError):
    """The named head is not served (ListTasks lists those that are)."""


class UnauthenticatedError(TaskMuxError):
    """The gateway wants an API key and the call carried none it knows; never retried."""


class PermissionDeniedError(TaskMuxError):
    """The key is valid but its tenant may not use a head of the call; never retried."""


class DeadlineExceededError(TaskMuxError):
    """No result before the call's deadline."""


class UnavailableError(TaskMuxError):
    """The service stayed unreachable through every retry."""


class ResourceExhaustedError(TaskMuxError):
    """The head's queue stayed full through every retry, or the message is too large."""


class InternalError(TaskMuxError):
    """A server bug; report the reference in the message."""


_BY_CODE: dict[grpc.StatusCode, type[TaskMuxError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_for(
    status: grpc.StatusCode,
    message: str,
    *,
    request_id: str = "",
    attempts: int = 1,
    retry_after_s: float | None = None,
) -> TaskMuxError:
    """The exception of the right class for a status."""
    cls = _BY_CODE.get(status, TaskMuxError)
    return cls(
        status, message, request_id=request_id, attempts=attempts, retry_after_s=retry_after_s
    )
