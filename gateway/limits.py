"""Per-tenant rate limits and quotas, shared by every gateway replica through Redis.

Each tenant of the keys file (gateway/auth.py) may carry:

    rate_per_s      sustained requests per second (a Pipeline task counts as one request)
    burst           requests allowed at once above that rate (default: one second's worth)
    quota_units     text units per quota window (see `request_units`)
    quota_window_s  the window, aligned to the Unix epoch (86400: a UTC day)

The rate is a GCRA (generic cell rate algorithm) bucket: one timestamp per tenant, the
"theoretical arrival time" of its next request. The quota is a counter per fixed window.
Both are checked and updated by one Lua script (`router.scripts.LIMIT_CHARGE`), so
concurrent calls on many gateways see one consistent state, and the clock is Redis's own
(`TIME`), so gateway clock skew does not matter. A refused request changes nothing. Over
a limit the caller gets RESOURCE_EXHAUSTED with a retry hint: when the bucket admits the
next request, or when the quota window ends.

A tenant pays only for work queued for a worker. The gateway charges a call right before
it queues the call's jobs, after its idempotency claim, so a replayed result is free; if
the queue then refuses the jobs (a full backlog, Redis out of memory or unreachable),
`refund` gives back the request and its units. Calls refused before that point (the
memory guard, an idempotency conflict, validation) are never charged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import ResourceExhausted, redis_errors
from router import keys, scripts

log = logging.getLogger(__name__)

# Verdicts of `scripts.LIMIT_CHARGE`.
ADMITTED, OVER_RATE, OVER_QUOTA, OVER_WHOLE_QUOTA = 0, 1, 2, 3


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits; zero means unlimited."""

    rate_per_s: float = 0.0
    burst: int = 0
    quota_units: int = 0
    quota_window_s: int = 86_400

    @property
    def unlimited(self) -> bool:
        return self.rate_per_s <= 0 and self.quota_units <= 0

    def effective_burst(self) -> int:
        """Requests admitted at once: `burst`, or one second's worth (at least 1)."""
        return self.burst or max(1, math.ceil(self.rate_per_s))


class Limiter:
    """Charges each call to its tenant's rate and quota in Redis."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._charge = redis.register_script(scripts.LIMIT_CHARGE)
        self._refund = redis.register_script(scripts.LIMIT_REFUND)

    async def charge(self, tenant: str, limits: TenantLimits, units: int) -> None:
        """Admit one request of `units` text units, or raise ResourceExhausted."""
        if limits.unlimited:
            return
        with redis_errors("the rate limiter"):
            verdict, retry_ms, left = await self._charge(
                keys=[keys.tenant_rate(tenant), keys.tenant_quota(tenant)],
                args=_args(limits, units),
            )
        if verdict == OVER_RATE:
            raise ResourceExhausted(
                f"tenant {tenant!r} is over its rate limit of {limits.rate_per_s:g} requests/s "
                f"(burst {limits.effective_burst()}); retry after {retry_ms} ms",
                retry_after_ms=int(retry_ms),
            )
        if verdict == OVER_QUOTA:
            raise ResourceExhausted(
                f"tenant {tenant!r} has {left} of its {limits.quota_units} text units left in "
                f"this {limits.quota_window_s} s quota window and this request needs {units}; "
                f"the window resets in {retry_ms} ms",
                retry_after_ms=int(retry_ms),
            )
        if verdict == OVER_WHOLE_QUOTA:
            raise ResourceExhausted(
                f"this request needs {units} text units, more than tenant {tenant!r}'s whole "
                f"quota of {limits.quota_units} per window: split it into smaller requests",
                retry_after_ms=0,
            )

    async def refund(self, tenant: str, limits: TenantLimits, units: int) -> None:
        """Undo one admitted `charge` whose work was not queued; best effort."""
        if limits.unlimited:
            return
        try:
            await self._refund(
                keys=[keys.tenant_rate(tenant), keys.tenant_quota(tenant)],
                args=_args(limits, units),
            )
        except RedisError as err:  # the tenant keeps the charge: logged, not the caller's error
            log.warning("could not refund tenant %r for unqueued work: %s", tenant, err)


def _args(limits: TenantLimits, units: int) -> list[str | int]:
    """The scripts' ARGV for one request."""
    interval_ms = 1000 / limits.rate_per_s if limits.rate_per_s > 0 else 0
    return [
        repr(interval_ms),
        limits.effective_burst(),
        limits.quota_units,
        limits.quota_window_s * 1000,
        units,
    ]
