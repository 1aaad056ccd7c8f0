"""When to retry a failed call, and how long to wait first.

Only UNAVAILABLE (the service or its queue is unreachable) and RESOURCE_EXHAUSTED with
a retry hint (a full queue) are retried; every other status is final on the first try.
A RESOURCE_EXHAUSTED without a hint means the message is over the server's size
limit, which no retry can fix. Waits grow exponentially with full jitter, are never
shorter than the server's hint (`google.rpc.RetryInfo` in the rich status, else the
`retry-after-ms` trailing metadata), and never run past the call's deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from taskmux_client.errors import TaskMuxError, error_for

RETRY_AFTER_METADATA = "retry-after-ms"
STATUS_DETAILS_METADATA = "grpc-status-details-bin"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how patiently to retry one logical call."""

    # Attempts in all, the first included; 1 disables retries.
    max_attempts: int = 5
    # Upper bound of the first wait; the bound doubles (`multiplier`) per attempt.
    initial_backoff_s: float = 0.1
    multiplier: float = 2.0
    # Cap on the bound, whatever the attempt number.
    max_backoff_s: float = 5.0
    # Extra random fraction added to a server hint, so clients told the same hint spread.
    hint_jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("max_attempts >= 1, initial_backoff_s >= 0, multiplier >= 1")

    def backoff_s(self, failed_attempts: int, hint_s: float | None, rng: random.Random) -> float:
        """The wait after `failed_attempts` failures: full jitter, at least the server hint."""
        bound = min(
            self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (failed_attempts - 1)
        )
        delay = rng.uniform(0, bound)
        if hint_s is not None:
            delay = max(delay, hint_s * (1 + rng.uniform(0, self.hint_jitter)))
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Attempt:
    """One attempt of a call, as the `on_attempt` hook sees it once it has ended."""

    method: str
    number: int  # 1 for the first attempt
    request_id: str
    code: grpc.StatusCode  # OK when it succeeded
    # The wait before the next attempt; None when there is none (success or final error).
    retry_in_s: float | None


AttemptHook = Callable[[Attempt], None]


def retry_hint_s(error: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds: RetryInfo first, then `retry-after-ms`."""
    metadata = _trailing(error)
    for key, value in metadata:
        if key == STATUS_DETAILS_METADATA and isinstance(value, bytes):
            try:
                status = Status.FromString(value)
            except DecodeError:
                continue
            for detail in status.details:
                info = RetryInfo()
                if detail.Unpack(info):  # False for other detail types
                    return info.retry_delay.ToMilliseconds() / 1000
    for key, value in metadata:
        if key == RETRY_AFTER_METADATA:
            try:
                return max(int(value), 0) / 1000
            except (TypeError, ValueError):
                continue
    return None


class RetryLoop:
    """The state of one logical call across its attempts (shared by the sync and async clients)."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        method: str,
        request_id: str,
        timeout_s: float,
        rng: random.Random,
        on_attempt: AttemptHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._method = method
        self._request_id = request_id
        self._rng = rng
        self._on_attempt = on_attempt
        self._clock = clock
        self._deadline = clock() + timeout_s
        self.attempts = 0

    @property
    def request_id(self) -> str:
        """The id every attempt of the call sends."""
        return self._request_id

    def attempt_timeout_s(self) -> float:
        """The time left for the next attempt: what remains of the call's deadline."""
        self.attempts += 1
        return max(self._deadline - self._clock(), 0.001)

    def succeeded(self) -> None:
        """Record the successful attempt."""
        self._report(grpc.StatusCode.OK, None)

    def failed(self, error: grpc.RpcError) -> float:
        """The wait before retrying `error`; raises the TaskMuxError when it is final."""
        code = _code(error)
        hint_s = retry_hint_s(error)
        retry_in_s = None
        if self._retryable(code, hint_s) and self.attempts < self._policy.max_attempts:
            delay = self._policy.backoff_s(self.attempts, hint_s, self._rng)
            if self._clock() + delay < self._deadline:
                retry_in_s = delay
        self._report(code, retry_in_s)
        if retry_in_s is None:
            raise error_for(
                code,
                _details(error),
                request_id=self._request_id,
                attempts=self.attempts,
                retry_after_s=hint_s,
            ) from None
        return retry_in_s

    def _retryable(self, code: grpc.StatusCode, hint_s: float | None) -> bool:
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return hint_s is not None
        return code in RETRYABLE

    def _report(self, code: grpc.StatusCode, retry_in_s: float | None) -> None:
        if self._on_attempt is not None:
            self._on_attempt(
                Attempt(self._method, self.attempts, self._request_id, code, retry_in_s)
            )


class StreamRetry:
    """A server-streaming call's retries: like a unary call's until its first result, then none.

    A retry after a result has reached the caller would send that result again, so a
    failure then is final.
    """

    def __init__(self, loop: RetryLoop) -> None:
        self._loop = loop
        self._started = False

    def attempt_timeout_s(self) -> float:
        """The time left for the next attempt (see `RetryLoop.attempt_timeout_s`)."""
        return self._loop.attempt_timeout_s()

    def succeeded(self) -> None:
        """Record a result, or the end of the stream: the first of them ends the retries."""
        if not self._started:
            self._started = True
            self._loop.succeeded()

    def failed(self, error: grpc.RpcError) -> float:
        """The wait before retrying `error`; raises the TaskMuxError when it is final."""
        if self._started:
            raise final_error(error, self._loop.request_id) from None
        return self._loop.failed(error)


def final_error(error: grpc.RpcError, request_id: str) -> TaskMuxError:
    """The TaskMuxError for a failure that is not retried (streams after their first result)."""
    return error_for(
        _code(error), _details(error), request_id=request_id, retry_after_s=retry_hint_s(error)
    )


def _code(error: grpc.RpcError) -> grpc.StatusCode:
    code = getattr(error, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    value = details() if callable(details) else None
    return value if isinstance(value, str) else str(error)


def _trailing(error: grpc.RpcError) -> list[tuple[str, str | bytes]]:
    trailing = getattr(error, "trailing_metadata", None)
    metadata: Iterable[tuple[str, str | bytes]] | None = trailing() if callable(trailing) else None
    return [(str(k), v) for k, v in metadata or ()]
