"""The clean keyspace between tests that share a cluster: what calls leave goes, what the
processes and the module's set-up own stays."""

from __future__ import annotations

import redis

from router import keys
from tests.clusters import reset_keyspace


def test_reset_clears_call_state_and_keeps_what_processes_own(valkey_url: str) -> None:
    stream = keys.task_stream("embed")
    with redis.Redis.from_url(valkey_url) as r:
        r.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
        r.xadd(stream, {"job": "pending"})
        r.xreadgroup(keys.WORKER_GROUP, "a-worker", {stream: ">"})  # now pending with it
        r.xadd(stream, {"job": "queued"})
        r.set(keys.idempotency_key("embed", "", "k"), "done")
        r.set(keys.tenant_rate("acme"), "1")
        r.xadd(keys.DEAD_LETTER_STREAM, {"reason": "broken"})
        owned = [keys.CATALOG_KEY, keys.worker_catalog("w"), keys.reply_stream("g"), "other-app:1"]
        r.set(keys.CATALOG_KEY, "{}")
        r.set(keys.worker_catalog("w"), "{}")
        r.xadd(keys.reply_stream("g"), {"v": "init"})
        r.set("other-app:1", "x")

        reset_keyspace(valkey_url)

        assert r.xlen(stream) == 0
        assert r.xpending(stream, keys.WORKER_GROUP)["pending"] == 0
        (group,) = r.xinfo_groups(stream)  # kept: workers read through it
        assert group["name"] == keys.WORKER_GROUP.encode()
        assert not r.exists(
            keys.idempotency_key("embed", "", "k"),
            keys.tenant_rate("acme"),
            keys.DEAD_LETTER_STREAM,
        )
        assert r.exists(*owned) == len(owned)
