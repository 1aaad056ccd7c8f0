"""Channel options that suit the retry policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskmux_client.retry import RetryPolicy

# Fail fast on a dead connection and reconnect about as often as the policy retries:
# gRPC's own reconnect backoff (1 s growing to 120 s) would otherwise make every retry
# fail at once while the channel waits to reconnect.
MIN_RECONNECT_MS = 100


def channel_options(policy: RetryPolicy, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Reconnect backoff bounded by the policy's; `extra` options override these."""
    max_ms = max(int(policy.max_backoff_s * 1000), MIN_RECONNECT_MS)
    options: dict[str, Any] = {
        "grpc.initial_reconnect_backoff_ms": MIN_RECONNECT_MS,
        "grpc.min_reconnect_backoff_ms": MIN_RECONNECT_MS,
        "grpc.max_reconnect_backoff_ms": max_ms,
    }
    options.update(dict(extra))
    return list(options.items())
