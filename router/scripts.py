"""The Lua scripts that act on taskmux keys, next to the schema they act on (`router.keys`).

Each script is one atomic step on the keys its comment names, in one round trip. The
gateway registers them once per Redis client (`redis.register_script`), so a call costs
an `EVALSHA`, which `router.acl` grants on exactly those keys. A script touches only the
keys passed in KEYS (k8s/README.md says which would need a hash tag on a Redis Cluster).

    script               acts on (router.keys)                  run by
    ENQUEUE              task_stream [, idempotency_key]        gateway.dispatch
    IDEMPOTENCY_RELEASE  idempotency_key (an IdempotencyRecord)  gateway.idempotency
    IDEMPOTENCY_RENEW    idempotency_key                        gateway.idempotency
    IDEMPOTENCY_STORE    idempotency_key                        gateway.idempotency
    LIMIT_CHARGE         tenant_rate, tenant_quota              gateway.limits
    LIMIT_REFUND         tenant_rate, tenant_quota              gateway.limits
"""

from __future__ import annotations

from typing import Final

# Add jobs to a stream only while it holds fewer than ARGV[1] entries: the check and
# the XADDs are one atomic step and one round trip (measured: about as fast as a plain
# XADD, where a separate XLEN costs a second round trip). With a second key, first claim
# that idempotency record (SET NX PX, as `gateway.idempotency` does on its own), and
# queue nothing if another call holds it: the claim costs no round trip of its own.
# Returns {added, length}: added 1, 0 for a full backlog (nothing claimed), -1 for a
# record held by another call.
# KEYS: the job stream [, an idempotency record]. ARGV: max backlog, job count, then per
# job its field count and its fields [, then the claim's value and its lease in ms].
ENQUEUE: Final = """
local backlog = redis.call('XLEN', KEYS[1])
if backlog >= tonumber(ARGV[1]) then return {0, backlog} end
if KEYS[2] and not redis.call('SET', KEYS[2], ARGV[#ARGV - 1], 'NX', 'PX', ARGV[#ARGV]) then
  return {-1, backlog}
end
local pos, jobs = 3, tonumber(ARGV[2])
for _ = 1, jobs do
  local n = tonumber(ARGV[pos])
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, pos + 1, pos + n))
  pos = pos + n + 1
end
return {1, backlog + jobs}
"""

# Delete the record only if it still holds this call's pending claim (ARGV[1]).
IDEMPOTENCY_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extend this call's pending claim (ARGV[1]) to ARGV[2] ms, if it still holds the record.
IDEMPOTENCY_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Store the done record ARGV[2] with a TTL of ARGV[3] ms, unless the record now belongs
# to a different request: one whose request hash (bytes 3 to 34 of the record) is not
# ARGV[1]. Returns 1 when stored.
IDEMPOTENCY_STORE: Final = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 3, 34) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# Charge one request to a tenant's GCRA rate bucket and quota window (gateway/limits.py).
# KEYS: the tenant's rate key, then its quota key.
# ARGV: ms between requests at the sustained rate (0: no rate limit), burst, quota units
# per window (0: no quota), window ms, this request's units.
# Returns {verdict, retry_after_ms, units left}: verdict 0 admitted, 1 over the rate,
# 2 over the quota, 3 bigger than the whole quota.
LIMIT_CHARGE: Final = """
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

# Undo one admitted charge (same KEYS and ARGV as LIMIT_CHARGE): the GCRA time goes back
# one interval (never before now, which is what an absent key means) and the units go
# back to the quota if its window has not ended since. Keys keep their TTLs. allow-oom:
# it never adds memory, and a refund must not fail because Redis refused the enqueue for
# memory.
LIMIT_REFUND: Final = """#!lua flags=allow-oom
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
