"""Per-tenant rate limits and quotas, shared by every gateway replica through Redis.

Each tenant of the keys file (gateway/auth.py) may carry:

    rate_per_s      sustained requests per second (a Pipeline task counts as one request)
    burst           requests allowed at once above that rate (default: one second's worth)
    quota_units     text units per quota window (see `request_units`)
    quota_window_s  the window, aligned to the Unix epoch (86400: a UTC day)

The rate is a GCRA (generic cell rate algorithm) bucket: one timestamp per tenant, the
"theoretical arrival time" of its next request. The quota is a counter per fixed window.
Both are checked and updated by one Lua script, so concurrent calls on many gateways see
one consistent state, and the clock is Redis's own (`TIME`), so gateway clock skew does
not matter. A refused request changes nothing. Over a limit the caller gets
RESOURCE_EXHAUSTED with a retry hint: when the bucket admits the next request, or when
the quota window ends.

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

from gateway.errors import ResourceExhausted, from_redis
from router import keys

log = logging.getLogger(__name__)

# ARGV: ms between requests at the sustained rate (0: no rate limit), burst, quota units
# per window (0: no quota), window ms, this request's units.
# Returns {verdict, retry_after_ms, units left}: verdict 0 admitted, 1 over the rate,
# 2 over the quota, 3 bigger than the whole quota.
CHARGE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local quota, window, units = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local new_tat = nil
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then tat = now end
  new_tat = tat + interval
  local wait = new_tat - now - burst * interval
  if wait > 0 then return {1, math.ceil(wait), -1} end
end
local index, used = nil, 0
if quota > 0 then
  if units > quota then return {3, 0, quota} end
  index = math.floor(now / window)
  local state = redis.call('HMGET', KEYS[2], 'window', 'used')
  if tonumber(state[1]) == index then used = tonumber(state[2]) end
  if used + units > quota then return {2, (index + 1) * window - now, quota - used} end
end
if new_tat then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((burst + 1) * interval))
end
if index then
  redis.call('HSET', KEYS[2], 'window', index, 'used', used + units)
  redis.call('PEXPIRE', KEYS[2], window)
end
return {0, 0, quota - used - units}
"""

# Undo one admitted charge (same ARGV as CHARGE_SCRIPT): the GCRA time goes back one
# interval (never before now, which is what an absent key means) and the units go back to
# the quota if its window has not ended since. Keys keep their TTLs. allow-oom: it never
# adds memory, and a refund must not fail because Redis refused the enqueue for memory.
REFUND_SCRIPT = """#!lua flags=allow-oom
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, quota = tonumber(ARGV[1]), tonumber(ARGV[3])
local window, units = tonumber(ARGV[4]), tonumber(ARGV[5])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if tat then redis.call('SET', KEYS[1], tostring(math.max(tat - interval, now)), 'KEEPTTL') end
end
if quota > 0 then
  local state = redis.call('HMGET', KEYS[2], 'window', 'used')
  if tonumber(state[1]) == math.floor(now / window) and state[2] then
    redis.call('HSET', KEYS[2], 'used', math.max(tonumber(state[2]) - units, 0))
  end
end
return 0
"""

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
        self._charge = redis.register_script(CHARGE_SCRIPT)
        self._refund = redis.register_script(REFUND_SCRIPT)

    async def charge(self, tenant: str, limits: TenantLimits, units: int) -> None:
        """Admit one request of `units` text units, or raise ResourceExhausted."""
        if limits.unlimited:
            return
        try:
            verdict, retry_ms, left = await self._charge(
                keys=[keys.tenant_rate(tenant), keys.tenant_quota(tenant)],
                args=_args(limits, units),
            )
        except RedisError as err:
            raise from_redis(err, "the rate limiter") from err
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
