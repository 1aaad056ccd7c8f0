"""A typed Python client for taskmux, blocking (`TaskMuxClient`) or asyncio (`AsyncTaskMuxClient`).

    from taskmux_client import TaskMuxClient

    with TaskMuxClient("127.0.0.1:50051", timeout_s=10) as client:
        vectors = client.embed(["hello", "world"]).embeddings

A gateway with TLS and API keys: `TaskMuxClient("gw:443", tls=True, api_key=key)`, or
`tls=TLSConfig.from_files(ca_file, cert_file, key_file)` for a private CA and mutual TLS.

Calls return the generated response messages of `taskmux.v1`; failures raise
`TaskMuxError` subclasses. UNAVAILABLE and hinted RESOURCE_EXHAUSTED are retried with
the same request_id and idempotency_key, so a retried call is computed once.
"""

from taskmux_client._requests import Task, TaskRequest
from taskmux_client.aio import AsyncTaskMuxClient
from taskmux_client.channel import TLSConfig, read_api_key
from taskmux_client.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TaskMuxError,
    UnauthenticatedError,
    UnavailableError,
)
from taskmux_client.retry import NO_RETRY, Attempt, RetryPolicy, retry_hint_s
from taskmux_client.sync import TaskMuxClient

__all__ = [
    "NO_RETRY",
    "AsyncTaskMuxClient",
    "Attempt",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "TLSConfig",
    "Task",
    "TaskMuxClient",
    "TaskMuxError",
    "TaskRequest",
    "UnauthenticatedError",
    "UnavailableError",
    "read_api_key",
    "retry_hint_s",
]
