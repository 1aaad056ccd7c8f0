"""Least-privilege Redis ACL users for gateways, workers and KEDA (Redis 7+ or Valkey).

Each user may run only the commands its code sends, and each command only on the keys
(`router.keys`) it needs it for: every grant below becomes one ACL selector, `(commands
keys)`, so for example a worker can XADD to reply streams and the dead-letter stream but
not to a job stream, and a gateway can read the catalog but not write it. Neither user can
run administrative commands (CONFIG, FLUSHALL, KEYS, ACL, ...), use pub/sub, or touch a key
outside `taskmux:v1:`. `%R~` allows reading a key, `%W~` writing it, `~` both.

Lua scripts (the gateway's enqueue, idempotency and rate-limit scripts) run as the calling
user, so each command a script calls is granted like a direct one, next to `EVALSHA`;
redis-py loads a script the server does not have yet with `SCRIPT LOAD`. `PING` is
redis-py's idle health check (`router.connection.connect` sends no `CLIENT SETINFO`).

Neither user needs `SCAN` (which would list every key name of the database): gateways
find the live workers' catalogs through the worker registry (`router.registry`). Still,
give taskmux a Redis of its own, or at least a database.

KEDA's redis-streams scaler (k8s/base/worker-scaling.yaml) only reads the job streams'
backlog; the operators' admin user may do anything; and the `default` user, which every
connection is until it authenticates, is switched off (an aclfile that does not name it
would leave it on, without a password, allowed everything).

`taskmux redis-acl` prints these users as `ACL SETUSER` commands or aclfile lines. The
grants must change with the code: tests/integration/test_redis_security.py runs every RPC as these
users against a real server and fails on any ACL denial.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from router import keys

TASKS = f"~{keys.task_stream('*')}"
REPLIES = f"~{keys.reply_stream('*')}"
CATALOGS = f"~{keys.CATALOG_KEY}*"  # the shared catalog and every worker's own
WORKERS = f"~{keys.WORKERS_KEY}"
STATS = f"~{keys.worker_stats('*')}"
IDEMPOTENCY = f"~{keys.PREFIX}idem:*"
LIMITS = f"~{keys.PREFIX}limit:*"
DEAD = f"~{keys.DEAD_LETTER_STREAM}"
# Sent on idle connections, before any key is used.
CONNECTION_COMMANDS = ("ping",)


@dataclass(frozen=True)
class Grant:
    """Commands allowed on keys matching patterns: one ACL selector."""

    commands: tuple[str, ...]
    keys: tuple[str, ...]

    def selector(self) -> str:
        rules = [*(f"+{c}" for c in self.commands), *self.keys]
        return f"({' '.join(rules)})"


@dataclass(frozen=True)
class AclUser:
    """An ACL user: keyless commands plus one selector per grant."""

    name: str
    keyless: tuple[str, ...]
    grants: tuple[Grant, ...]
    # Key and channel patterns outside any selector: every command on them (admin only).
    patterns: tuple[str, ...] = ()

    def rules(self, password_rule: str) -> list[str]:
        """The ACL rules, after `reset` so that applying them twice gives the same user.

        `password_rule` is `>password` or `#<sha256 hex of the password>`.
        """
        return [
            "reset",
            "on",
            password_rule,
            "resetchannels",
            "-@all",
            *(f"+{c}" for c in self.keyless),
            *self.patterns,
            *(g.selector() for g in self.grants),
        ]


def _read_only(pattern: str) -> str:
    return "%R" + pattern


def _write_only(pattern: str) -> str:
    return "%W" + pattern


GATEWAY = AclUser(
    name="taskmux-gateway",
    # TIME: the rate limiter uses Redis's clock (gateway/limits.py). INFO: the memory
    # guard reads used_memory and maxmemory (gateway/memory.py); it shows server
    # figures, never keys or values.
    keyless=(*CONNECTION_COMMANDS, "script|load", "time", "info"),
    grants=(
        # Enqueue script: XLEN for the backlog bound, then XADD (gateway/dispatch.py).
        Grant(("evalsha", "xlen", "xadd"), (TASKS,)),
        # ... which may claim the call's idempotency record on the way (one selector
        # must cover every key of a command).
        Grant(("evalsha",), (TASKS, IDEMPOTENCY)),
        # Own reply stream: created, kept alive, read and trimmed (gateway/replies.py).
        Grant(("exists", "xadd", "xdel", "xread", "expire", "del"), (REPLIES,)),
        # Live workers' catalogs, or the last one left (gateway/catalog.py) ...
        Grant(("get", "mget"), (_read_only(CATALOGS),)),
        # ... found through the registry, which it rids of dead workers (router/registry.py).
        Grant(("smembers", "srem"), (WORKERS,)),
        # Claims, results and their scripts (gateway/idempotency.py).
        Grant(("evalsha", "get", "set", "del", "pexpire"), (IDEMPOTENCY,)),
        # Per-tenant rate and quota script (gateway/limits.py).
        Grant(("evalsha", "get", "set", "hmget", "hset", "pexpire"), (LIMITS,)),
    ),
)

WORKER = AclUser(
    name="taskmux-worker",
    # MULTI/EXEC: replies and acknowledgements are written as one transaction
    # (workers/consumer.py `finish`); the commands inside are checked like direct ones.
    keyless=(*CONNECTION_COMMANDS, "multi", "exec"),
    grants=(
        # Consuming job streams (workers/consumer.py), including reclaiming a dead
        # worker's entries (XAUTOCLAIM, XPENDING) and keeping its own (XCLAIM JUSTID);
        # XLEN and XPENDING also feed the backlog metrics (workers/metrics.py).
        Grant(
            (
                "xgroup|create",
                "xreadgroup",
                "xautoclaim",
                "xpending",
                "xclaim",
                "xack",
                "xdel",
                "xlen",
            ),
            (TASKS,),
        ),
        # Replies and dead letters; XADD only, and never to a job stream.
        Grant(("xadd",), (_write_only(REPLIES), _write_only(DEAD))),
        # Publishing its catalog and registering, and undoing both on exit
        # (router/registry.py).
        Grant(("set", "del"), (_write_only(CATALOGS),)),
        Grant(("sadd", "srem"), (_write_only(WORKERS),)),
        # Its counters hash (workers/consumer.py).
        Grant(("hincrby", "expire"), (STATS,)),
    ),
)

KEDA = AclUser(
    name="taskmux-keda",
    # go-redis PINGs each new connection; the lag trigger reads INFO's redis_version
    # before every XINFO GROUPS (KEDA refuses lag below Redis 7). INFO shows server
    # figures, never keys or values. HELLO (go-redis's RESP3 login) needs no grant, and
    # its CLIENT SETINFO may be refused: go-redis ignores that.
    keyless=(*CONNECTION_COMMANDS, "info"),
    grants=(
        # lagCount: XINFO GROUPS (XLEN while the group does not exist yet);
        # pendingEntriesCount: XPENDING. Read-only, and only on job streams.
        Grant(("xinfo|groups", "xpending", "xlen"), (_read_only(TASKS),)),
    ),
)

# For people, not processes: kubectl exec ... valkey-cli, and Valkey's readiness probe.
ADMIN = AclUser(name="taskmux-admin", keyless=("@all",), grants=(), patterns=("~*", "&*"))

# Valkey replicas log in to their primary as this user (`masteruser`, k8s/overlays/ha):
# PSYNC and REPLCONF to replicate, PING to keep the link alive. No keys, no channels.
REPLICA = AclUser(name="taskmux-replica", keyless=("psync", "replconf", "ping"), grants=())

# Sentinel logs in to every Valkey as this user (`sentinel auth-user`, k8s/overlays/ha):
# the commands Sentinel's documentation lists, to watch (INFO, ROLE, PING), to talk to the
# other Sentinels (hello messages on one channel) and to fail over (REPLICAOF in
# MULTI/EXEC, CONFIG REWRITE, CLIENT KILL of the old primary's clients; and for
# `SENTINEL FAILOVER taskmux COORDINATED`, CLIENT PAUSE WRITE and FAILOVER TO on the
# primary, CLIENT UNPAUSE after). No keys.
SENTINEL = AclUser(
    name="taskmux-sentinel",
    keyless=(
        *CONNECTION_COMMANDS,
        "info",
        "role",
        "multi",
        "exec",
        "slaveof",
        "replicaof",
        "config|rewrite",
        "client|setname",
        "client|kill",
        "client|pause",
        "client|unpause",
        "failover",
        "script|kill",
        "subscribe",
        "publish",
    ),
    grants=(),
    patterns=("&__sentinel__:hello",),
)

USERS = (GATEWAY, WORKER, KEDA, ADMIN)
# The users a replicated set with Sentinel needs on top (k8s/overlays/ha).
HA_USERS = (REPLICA, SENTINEL)
# The user a connection is before AUTH: off, so that nothing runs unauthenticated.
DEFAULT_USER = "default"
DEFAULT_USER_RULES = ("reset", "off")


def password_hash(password: str) -> str:
    """The `#<sha256 hex>` rule for a password, so that an aclfile need not hold it."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def setuser_args(user: AclUser, password_rule: str) -> list[str]:
    """`ACL SETUSER` arguments for `user` (pass to `execute_command("ACL", *args)`)."""
    return ["SETUSER", user.name, *user.rules(password_rule)]


def aclfile_line(user: AclUser, password_rule: str) -> str:
    """`user` as a line of a Redis aclfile (`aclfile` in redis.conf / valkey.conf)."""
    return _aclfile_line(user.name, user.rules(password_rule))


def default_user_setuser_args() -> list[str]:
    """`ACL SETUSER` arguments that switch the default user off."""
    return ["SETUSER", DEFAULT_USER, *DEFAULT_USER_RULES]


def default_user_aclfile_line() -> str:
    """The aclfile line that switches the default user off."""
    return _aclfile_line(DEFAULT_USER, DEFAULT_USER_RULES)


def _aclfile_line(name: str, rules: Sequence[str]) -> str:
    # Each aclfile line already starts from an empty user.
    return " ".join(["user", name, *(r for r in rules if r != "reset")])
