"""The Valkey of k8s/base, with the aclfile k8s/README.md (step 2) has operators build:
k8s/base/valkey.conf loads it, the default user is refused, every user logs in with its
password file, and KEDA's user runs exactly what the redis-streams scaler sends."""

from __future__ import annotations

import contextlib
import io
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from router import keys
from router.acl import ADMIN, GATEWAY, HA_USERS, KEDA, USERS, WORKER
from taskmux.aclcli import PASSWORD_OPTIONS
from taskmux.cli import main as taskmux_cli
from taskmux.local import free_port, redis_binary, wait_for_redis
from tests.harness import Proc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VALKEY_CONF = ROOT / "k8s" / "base" / "valkey.conf"
# Directives of valkey.conf that cannot apply here, replaced on the command line: `dir`
# (/data, the pod's volume) is entered while the file is read, so it must go.
LOCAL_ONLY = {"dir"}
STREAM = keys.task_stream("embed")
DENIED = redis.exceptions.NoPermissionError


@dataclass
class Server:
    """Valkey started from k8s/base/valkey.conf and the generated aclfile."""

    port: int
    passwords: dict[str, str]

    def login(self, user: str, **options: object) -> redis.Redis:
        return self.connect(username=user, password=self.passwords[user], **options)

    def connect(self, **options: object) -> redis.Redis:
        # driver_info=None: no CLIENT SETINFO, which go-redis (KEDA) sends but ignores a
        # refusal of, and which none of these users may run. No retries: a refused login
        # is an answer here, not a network fault.
        return redis.Redis(
            port=self.port,
            driver_info=None,
            retry=Retry(NoBackoff(), 0),
            **options,  # type: ignore[arg-type]
        )


def _aclfile(workdir: Path, passwords: dict[str, str]) -> Path:
    """As k8s/README.md step 2: a password file per user (no newline: KEDA and
    valkey-cli take a Secret's bytes as they are), then `taskmux redis-acl`."""
    args = ["redis-acl", "--format", "aclfile"]
    for user in USERS:
        path = workdir / user.name
        path.write_text(passwords[user.name])
        args += [PASSWORD_OPTIONS[user.name], str(path)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert taskmux_cli(args) == 0
    aclfile = workdir / "users.acl"
    aclfile.write_text(out.getvalue())
    return aclfile


def _local_conf(workdir: Path) -> Path:
    lines = VALKEY_CONF.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not set(line.split()[:1]) & LOCAL_ONLY]
    assert len(lines) - len(kept) == len(LOCAL_ONLY)
    assert any(line.startswith("aclfile ") for line in kept), "valkey.conf loads no aclfile"
    conf = workdir / "valkey.conf"
    conf.write_text("\n".join(kept) + "\n")
    return conf


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("k8s-valkey")
    passwords = {user.name: secrets.token_hex(32) for user in USERS}
    port = free_port()
    # Command-line options come after the file's: loopback, a free port, the test's own
    # folder and aclfile instead of the pod's mounts. Everything else is the file's.
    argv = [
        redis_binary(), str(_local_conf(workdir)),
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
        "--aclfile", str(_aclfile(workdir, passwords)),
    ]  # fmt: skip
    log = workdir / "valkey.log"
    with log.open("wb") as out:
        proc = Proc("valkey", subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT), log)
    try:
        # As the readiness probe does: the admin user (hex passwords fit in a URL).
        wait_for_redis(f"redis://{ADMIN.name}:{passwords[ADMIN.name]}@127.0.0.1:{port}/0")
        yield Server(port, passwords)
    except Exception:
        print(proc.output())
        raise
    finally:
        proc.stop()


def test_the_k8s_config_is_in_force(server: Server) -> None:
    admin = server.login(ADMIN.name)
    assert admin.config_get("appendonly") == {"appendonly": "yes"}
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert sorted(admin.acl_users()) == sorted([*(u.name for u in USERS), "default"])


def test_the_default_user_is_refused(server: Server) -> None:
    with pytest.raises(redis.AuthenticationError):
        server.connect().ping()
    with pytest.raises(redis.AuthenticationError):
        server.connect(username="default", password="any").ping()
    assert "off" in server.login(ADMIN.name).acl_getuser("default")["flags"]


@pytest.mark.parametrize("user", [u.name for u in USERS])
def test_each_user_logs_in_with_its_password_file(server: Server, user: str) -> None:
    assert server.login(user).ping()
    with pytest.raises(redis.AuthenticationError):
        server.connect(username=user, password="wrong").ping()


def test_keda_reads_the_backlog_as_its_scaler_does(server: Server) -> None:
    admin = server.login(ADMIN.name)
    admin.delete(STREAM)
    admin.xgroup_create(STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
    for n in range(3):
        admin.xadd(STREAM, {"job": str(n)})
    admin.xreadgroup(keys.WORKER_GROUP, "worker-1", {STREAM: ">"}, count=1)
    # go-redis logs in with HELLO 3 AUTH, then PINGs (KEDA's connection check).
    keda = server.login(KEDA.name, protocol=3)
    assert keda.ping()
    # lagCount: INFO's redis_version (7+), XINFO GROUPS, XLEN while the group is missing.
    assert int(str(keda.info()["redis_version"]).split(".")[0]) >= 7
    (group,) = keda.xinfo_groups(STREAM)
    assert (group["name"], group["lag"]) == (keys.WORKER_GROUP.encode(), 2)
    assert keda.xlen(STREAM) == 3
    # pendingEntriesCount: XPENDING.
    assert keda.xpending(STREAM, keys.WORKER_GROUP)["pending"] == 1
    # KEDA reads this error, not a refusal, as "no stream yet" (lag 0).
    with pytest.raises(redis.ResponseError, match="no such key"):
        keda.xinfo_groups(keys.task_stream("not-yet"))


@pytest.mark.parametrize(
    "command",
    [
        ("XADD", STREAM, "*", "job", "forged"),  # enqueue work
        ("XRANGE", STREAM, "-", "+"),  # read callers' texts
        ("XREADGROUP", "GROUP", keys.WORKER_GROUP, "keda", "STREAMS", STREAM, ">"),
        ("XACK", STREAM, keys.WORKER_GROUP, "0-1"),
        ("XDEL", STREAM, "0-1"),
        ("XINFO", "STREAM", STREAM),
        ("XINFO", "CONSUMERS", STREAM, keys.WORKER_GROUP),
        ("XGROUP", "DESTROY", STREAM, keys.WORKER_GROUP),
        ("XINFO", "GROUPS", keys.reply_stream("gw-1")),  # only job streams
        ("XLEN", keys.DEAD_LETTER_STREAM),
        ("GET", f"{keys.PREFIX}idem:acme:key"),  # idempotency records: results
        ("GET", keys.CATALOG_KEY),
        ("SCAN", "0"),
        ("KEYS", "*"),
        ("CONFIG", "GET", "*"),
        ("ACL", "LIST"),
        ("FLUSHALL",),
        ("PUBLISH", "channel", "message"),
    ],
)
def test_keda_can_do_nothing_else(server: Server, command: tuple[str, ...]) -> None:
    with pytest.raises(DENIED):
        server.login(KEDA.name).execute_command(*command)


def test_gateway_and_worker_users_stay_as_they_were(server: Server) -> None:
    # The aclfile path changes nothing of theirs (tests/integration/test_redis_security.py runs them).
    gateway, worker = server.login(GATEWAY.name), server.login(WORKER.name)
    with pytest.raises(DENIED):
        worker.xadd(STREAM, {"job": "forged"})
    with pytest.raises(DENIED):
        gateway.set(keys.CATALOG_KEY, "{}")
    assert gateway.xlen(STREAM) >= 0


def _secret_names(node: object) -> set[str]:
    """Secrets a manifest refers to: volumes, secretKeyRef and KEDA's secretTargetRef."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("secretName"), str):
            found.add(node["secretName"])
        if isinstance(node.get("secretKeyRef"), dict):
            found.add(node["secretKeyRef"]["name"])
        for ref in node.get("secretTargetRef") or []:
            found.add(ref["name"])
        for value in node.values():
            found |= _secret_names(value)
    elif isinstance(node, list):
        for item in node:
            found |= _secret_names(item)
    return found


def test_the_k8s_readme_makes_this_aclfile_and_every_secret() -> None:
    readme = (ROOT / "k8s" / "README.md").read_text(encoding="utf-8")
    step = readme[readme.index("### 2. ") : readme.index("### 3. ")]
    assert "taskmux redis-acl --format aclfile" in step
    for user in USERS:
        assert PASSWORD_OPTIONS[user.name] in step
    # The ha overlay's section makes the aclfile again with its two users.
    ha = readme[readme.index("Three more Secrets") :]
    for user in HA_USERS:
        assert PASSWORD_OPTIONS[user.name] in ha
    manifests = [
        doc
        for path in sorted((ROOT / "k8s" / "base").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
    ]
    secrets_used = _secret_names(manifests)
    assert {"taskmux-redis-acl", "taskmux-redis-keda"} <= secrets_used
    missing = {name for name in secrets_used if f"secret generic {name}" not in step}
    missing -= {"taskmux-gateway-tls"}  # `create secret tls`, step 2b
    assert not missing, f"k8s/README.md step 2 does not create {sorted(missing)}"
