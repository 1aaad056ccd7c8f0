"""Every Redis key taskmux uses, in one place.

All keys start with `taskmux:v1:`; the `v1` changes only if the layout below does.
Who may run which command on which of these keys is `router.acl` (the Redis ACL users
`taskmux-gateway` and `taskmux-worker`); a new key or command here needs a grant there.
The Lua scripts that act on these keys are `router.scripts`.

With `TASKMUX_PAYLOAD_KEY_FILE` set (`router.payload`), everything below that holds a
user's text or result is sealed (AES-256-GCM) before it is written: a job entry's texts
and params, a reply entry's body, an idempotency record's stored response (and its
request hash is an HMAC); dead letters keep the sealed fields as they were. Key names,
ids, heads, kinds, deadlines, status codes and messages, request ids, tenants, counters
and catalogs stay in the clear (see `router.messages`).

What one call leaves in Redis, and for how long (Redis memory is bounded by design):
    job entry           one per job (per distinct text for Analyze) in its job stream;
                        deleted by the worker (XACK, XDEL) once the reply is written
    reply entry         one per job in the gateway's reply stream; deleted (XDEL) as
                        soon as the gateway reads it
    idempotency record  only for calls with an idempotency_key (the Python client sends
                        one on every call): a lease of IDEMPOTENCY_LEASE_MS while the
                        call computes, then the serialized response for
                        `idempotency_ttl_s` (default 60 s, twice the default client's
                        30 s retry window); deleted at once if the call fails
    limit keys          two per limited tenant, not per call: overwritten by each call
                        and expiring on their own (see Tenant limits)
So the steady state is the queued and in-flight work plus, for keyed calls, about
calls/s x `idempotency_ttl_s` x response size (an Embed of one text: a few KB).
Redis runs with `maxmemory-policy noeviction` (evicting would drop queued jobs). Each
gateway reads `INFO memory` every `monitor_interval_ms` and, from
`TASKMUX_REDIS_MEMORY_HIGH_WATER` (default 0.85) of `maxmemory`, answers new calls
RESOURCE_EXHAUSTED with a retry hint before they write anything (`gateway.memory`); a
write Redis still refuses for memory (OOM) is answered the same way.

Job streams: `taskmux:v1:tasks:<head>` (one Redis Stream per task head)
    Gateways `XADD` one entry per client request (fields: see `router.messages.Job`).
    Workers read them through the consumer group `taskmux-workers` with one
    `XREADGROUP` over every stream they serve. After a worker has written the reply it
    `XACK`s and `XDEL`s the entry, so a stream holds only queued or in-flight work.
    Job streams are never trimmed with MAXLEN: trimming would delete undelivered work.
    Instead gateways add to a stream only while its length (queued plus in-flight
    jobs) is under `max_backlog` (default 10,000), checked and added in one script
    (`XLEN`, then `XADD`s) so the check costs no extra round trip; past it the
    client gets RESOURCE_EXHAUSTED with a retry hint. One request's jobs (an Analyze
    call's) are added together, so a stream can exceed the bound by at most one
    request's jobs minus one. No TTL.
    Analyze jobs, which name several heads, share `taskmux:v1:tasks:_analyze`, which
    every worker reads ("_" cannot start a head name).

Reply streams: `taskmux:v1:replies:<gateway id>` (one per gateway process)
    Workers `XADD` replies (fields: see `router.messages.Reply`) with `NOMKSTREAM`, so a
    reply for a gateway that is gone creates nothing, and with an approximate
    `MAXLEN` of `REPLY_STREAM_MAXLEN` as a bound if a gateway stops reading. The
    gateway's single reader task `XREAD`s and `XDEL`s them. The gateway creates the
    stream at start and refreshes its TTL (`reply_ttl_s`, default 60 s) every
    `monitor_interval_ms` (default 1 s), in a loop of its own; the stream of a dead
    gateway expires on its own.

Catalogs: `taskmux:v1:catalog:<worker id>` and `taskmux:v1:catalog` (strings)
    The JSON model manifest (encoder and heads, without checksums) a worker serves.
    Each worker `SET`s its own key with a TTL of 3 x `catalog_refresh_s`, at start,
    every `catalog_refresh_s` and right after a hot reload, and deletes it on exit: the
    key is the worker's heartbeat. Gateways find the keys through the worker registry
    (below), never by scanning, and serve the union of the live workers' heads, so a
    head that only some workers have loaded is still accepted and waits in its stream
    for one of them.
    The worker also `SET`s the plain `taskmux:v1:catalog` (no TTL): gateways fall
    back to it when no worker is alive, so requests still queue while workers are
    scaled to zero.

Worker registry: `taskmux:v1:workers` (a set of worker ids)
    Each worker `SADD`s its id whenever it sets its catalog key (right after it) and
    `SREM`s it on exit. Every `monitor_interval_ms` each gateway reads it (`SMEMBERS`),
    then the members' catalog keys (one `MGET`), and `SREM`s the ids whose key has
    expired: workers killed before they could remove themselves. No TTL; it holds at
    most the live workers plus those that died since a gateway last looked
    (`router.registry`).

Worker counters: `taskmux:v1:stats:<worker id>` (a hash)
    Running totals per worker process: batches, jobs, encoder_rows (distinct texts
    encoded), head_results (results delivered, one per text and head), expired.
    Flushed twice a second, off the reply path; expires `WORKER_STATS_TTL_S` after
    the last update.
    encoder_rows < head_results shows texts shared between heads were encoded once.

Idempotency records: `taskmux:v1:idem:<job kind>:<sha256 hex of tenant NUL key>` (strings)
    One per idempotency key a client sent, scoped by tenant (the API-key tenant, ""
    without authentication) and by RPC (the job kind: embed, classify, entities,
    similarity, zero_shot, analyze; a Pipeline task uses its kind's). The value
    (`router.messages.IdempotencyRecord`) holds the SHA-256 of the request without its
    metadata and either "pending" with the owning call's
    token or "done" with the serialized response. A gateway claims a key with
    `SET NX PX` (pending; a lease of `IDEMPOTENCY_LEASE_MS` that the gateway renews
    while the call computes, so a crashed gateway's claim lapses within one lease),
    replaces it with the result
    (done; TTL `idempotency_ttl_s`, default 60 s) by a script that writes only if the
    key is absent or holds the same request hash, and on failure deletes its own
    pending record by compare-and-delete, so the next call computes again. Memory:
    about one response per key per TTL (see above).

Tenant limits: `taskmux:v1:limit:<tenant>:rate` (string) and `...:quota` (hash)
    Written only by gateways, through `router.scripts.LIMIT_CHARGE`, for tenants of the
    API keys file that have limits. `rate` holds the tenant's GCRA "theoretical arrival
    time" in ms (Redis clock) and expires once the bucket is full again; `quota` holds
    `window` (the window's index since the epoch) and `used` (text units charged in it),
    and expires with its window. Deleting either resets that tenant's limit. A call is
    charged right before its jobs are queued, and refunded by
    `router.scripts.LIMIT_REFUND` if the queue then refuses them.

Dead letters: `taskmux:v1:dead` (a stream)
    Entries no worker could decode (or open: a payload sealed with a key the worker
    lacks), with the raw fields (still sealed) and the reason, capped at about
    `DEAD_LETTER_MAXLEN` entries. Read it with `XRANGE taskmux:v1:dead - +`.
"""

from __future__ import annotations

import hashlib

PREFIX = "taskmux:v1:"
WORKER_GROUP = "taskmux-workers"
CATALOG_KEY = PREFIX + "catalog"
WORKERS_KEY = PREFIX + "workers"
DEAD_LETTER_STREAM = PREFIX + "dead"
DEAD_LETTER_MAXLEN = 10_000
REPLY_STREAM_MAXLEN = 100_000
WORKER_STATS_TTL_S = 86_400
IDEMPOTENCY_LEASE_MS = 3_000


def task_stream(head: str) -> str:
    """The job stream of one task head."""
    return f"{PREFIX}tasks:{head}"


def head_of_stream(stream: str) -> str:
    """The head name a job stream belongs to (inverse of `task_stream`)."""
    return stream.removeprefix(f"{PREFIX}tasks:")


def worker_catalog(worker_id: str) -> str:
    """The catalog of heads one live worker serves."""
    return f"{CATALOG_KEY}:{worker_id}"


def worker_stats(worker_id: str) -> str:
    """The counters hash of one worker process."""
    return f"{PREFIX}stats:{worker_id}"


def reply_stream(gateway_id: str) -> str:
    """The reply stream of one gateway process."""
    return f"{PREFIX}replies:{gateway_id}"


def idempotency_key(kind: str, tenant: str, key: str) -> str:
    """The idempotency record of one client key, sent by one tenant, for one job kind.

    The key is hashed: clients choose it, so it may be long or hold any character.
    """
    digest = hashlib.sha256(tenant.encode() + b"\0" + key.encode()).hexdigest()
    return f"{PREFIX}idem:{kind}:{digest}"


def tenant_rate(tenant: str) -> str:
    """The rate-limit state (GCRA arrival time) of one tenant."""
    return f"{PREFIX}limit:{tenant}:rate"


def tenant_quota(tenant: str) -> str:
    """The quota counter (window index and units used) of one tenant."""
    return f"{PREFIX}limit:{tenant}:quota"
