"""Payloads at rest, through running processes: no canary text or result reaches Redis's
memory or its AOF and RDB files when payloads are sealed (and they do when not, so the
search can fail); a rotated key keeps working; bad key files stop a process at start."""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from router import keys
from router.messages import Job
from router.payload import PayloadCipher, new_key_line
from tests.harness import Cluster, Proc, serving, wait_for_catalog, wait_until

pytestmark = pytest.mark.integration

TIMEOUT_S = 60


def _canaries() -> list[str]:
    """Unique strings, ASCII and not, one per place a text can travel."""
    tag = uuid.uuid4().hex[:12]
    return [f"cnry{tag}{i} Zürich 東京 🙂" for i in range(12)]


def _write_keys(path: Path, *lines: str) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# --- (a) the canary search -----------------------------------------------------------


def _send_everything(stub: taskmux_pb2_grpc.TaskMuxStub, c: list[str]) -> list[bytes]:
    """Every RPC that queues jobs, with and without idempotency keys; returns result
    canaries: the packed floats of embeddings the workers computed."""
    results = []
    for i, key in enumerate(("", uuid.uuid4().hex)):
        embed = stub.Embed(pb.EmbedRequest(texts=[c[i]], idempotency_key=key), timeout=TIMEOUT_S)
        results.append(struct.pack("<16f", *embed.embeddings[0].values[:16]))
        stub.Classify(
            pb.ClassifyRequest(head="intent", texts=[c[2 + i]], idempotency_key=key),
            timeout=TIMEOUT_S,
        )
        analyzed = stub.Analyze(
            pb.AnalyzeRequest(
                texts=[c[4 + i], c[4 + i]], heads=["intent", "entities"], idempotency_key=key
            ),
            timeout=TIMEOUT_S,
        )
        assert len(list(analyzed)) == 4  # two texts, two heads
    stub.ZeroShotClassify(
        pb.ZeroShotClassifyRequest(
            texts=[c[6]], labels=[c[7], "weather"], hypothesis_template="{} " + c[8]
        ),
        timeout=TIMEOUT_S,
    )
    tasks = [
        pb.PipelineRequest(id="1", embed=pb.EmbedRequest(texts=[c[9]])),
        pb.PipelineRequest(
            id="2",
            extract_entities=pb.ExtractEntitiesRequest(
                head="entities", texts=[c[10]], idempotency_key=uuid.uuid4().hex
            ),
        ),
    ]
    answers = list(stub.Pipeline(iter(tasks), timeout=TIMEOUT_S))
    assert sorted(a.id for a in answers) == ["1", "2"] and not any(
        a.HasField("error") for a in answers
    )
    return results


def _dead_letter(r: redis.Redis, text: str, cipher: PayloadCipher | None) -> None:
    """A job, written as a gateway writes it, that the worker dead-letters: it names one
    head but sits in another's stream."""
    job = Job(
        id=uuid.uuid4().hex,
        reply_to=keys.reply_stream("gone"),
        deadline_ms=int(time.time() * 1000) + 60_000,
        kind="classify",
        head="sentiment",
        texts=(text,),
    )
    r.xadd(keys.task_stream("intent"), job.encode(cipher))  # type: ignore[arg-type]
    wait_until(lambda: r.xlen(keys.DEAD_LETTER_STREAM) > 0, 30, "the dead letter")


def _values(r: redis.Redis) -> Iterator[bytes]:
    """Every key name and every value in the database, read by type."""
    for name in r.scan_iter(count=1000):
        yield name
        kind = r.type(name)
        if kind == b"string":
            yield r.get(name) or b""
        elif kind == b"stream":
            for _, fields in r.xrange(name):
                yield from (x for pair in fields.items() for x in pair)
        elif kind == b"hash":
            yield from (x for pair in r.hgetall(name).items() for x in pair)
        elif kind in (b"set", b"list", b"zset"):
            reads = {b"set": r.smembers, b"list": lambda n: r.lrange(n, 0, -1)}
            yield from reads.get(kind, lambda n: r.zrange(n, 0, -1))(name)
        else:
            raise AssertionError(f"key {name!r} has a type this search does not read: {kind!r}")


def _files(data_dir: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


def _persisted(r: redis.Redis, data_dir: Path) -> dict[str, bytes]:
    """The AOF as written so far plus a fresh RDB snapshot (BGSAVE, waited for)."""
    marker = f"marker-{uuid.uuid4().hex}"
    r.set(f"test:{marker}", marker)  # the AOF holds everything before it once it holds this
    wait_until(
        lambda: any(marker.encode() in b for b in _files(data_dir).values()), 30, "AOF write"
    )
    before = r.lastsave()
    r.bgsave()
    wait_until(lambda: r.lastsave() != before, 30, "BGSAVE")
    files = _files(data_dir)
    assert any(name.endswith(".rdb") for name in files), sorted(files)
    assert any("appendonly" in name for name in files), sorted(files)
    return files


def _found(needles: list[bytes], haystacks: dict[str, bytes]) -> dict[str, list[str]]:
    """Which needles each haystack holds (only those that hold any)."""
    found = {}
    for where, data in haystacks.items():
        hits = [n.decode("utf-8", "replace")[:20] for n in needles if n in data]
        if hits:
            found[where] = hits
    return found


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_keys(tmp_path_factory.mktemp("keys") / "payload.keys", new_key_line("k1"))


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "plaintext"])
def test_no_canary_at_rest_when_sealed(
    model_repo: Path, tmp_path: Path, key_file: Path, sealed: bool
) -> None:
    env = {"payload_key_file": str(key_file)} if sealed else {}
    with Cluster(model_repo, tmp_path) as cluster:
        cluster.start_redis(appendonly=True)
        data_dir = tmp_path / f"redis-{cluster.redis_port}"
        worker = cluster.start_worker(**env)
        gateway, address = cluster.start_gateway(**env)
        wait_until(lambda: serving(worker.address), 60, "worker SERVING")
        wait_for_catalog(address, model_repo)
        r = redis.Redis.from_url(cluster.redis_url)
        canaries = _canaries()
        with grpc.insecure_channel(address) as channel:
            results = _send_everything(taskmux_pb2_grpc.TaskMuxStub(channel), canaries)
        _dead_letter(r, canaries[11], PayloadCipher.from_file(key_file) if sealed else None)
        needles = [c.encode() for c in canaries] + results
        in_memory = _found(needles, {"redis values": b"\0".join(_values(r))})
        on_disk = _found(needles, _persisted(r, data_dir))
        logs = _found([c.encode() for c in canaries], {"logs": cluster.logs().encode()})
        expected_log = "sealed at rest" if sealed else "PLAINTEXT at rest"
        assert expected_log in gateway.output() and expected_log in worker.output()
    assert not logs
    if sealed:
        assert not in_memory and not on_disk, (in_memory, on_disk)
    else:  # the same search finds them: texts in jobs and dead letters, results in replies
        assert in_memory and on_disk
        everything = {c for hits in on_disk.values() for c in hits}
        assert len(everything) == len(needles), (sorted(everything), len(needles))


# --- (b) a rotated key ---------------------------------------------------------------


def test_rotation_and_a_worker_without_the_old_key(model_repo: Path, tmp_path: Path) -> None:
    old, new = new_key_line("old"), new_key_line("new")
    step1 = _write_keys(tmp_path / "step1.keys", old, new)  # the new key added, as second
    step2 = _write_keys(tmp_path / "step2.keys", new, old)  # the new key seals
    early = _write_keys(tmp_path / "early.keys", new)  # the old key dropped too soon
    with Cluster(model_repo, tmp_path) as cluster:
        cluster.start_redis()
        worker = cluster.start_worker(payload_key_file=str(step2))
        _, address = cluster.start_gateway(payload_key_file=str(step1))
        wait_until(lambda: serving(worker.address), 60, "worker SERVING")
        wait_for_catalog(address, model_repo)
        r = redis.Redis.from_url(cluster.redis_url)
        with grpc.insecure_channel(address) as channel:
            stub = taskmux_pb2_grpc.TaskMuxStub(channel)
            # Jobs sealed with the old key, replies with the new: both sides open both.
            embed = stub.Embed(pb.EmbedRequest(texts=["rotation"]), timeout=TIMEOUT_S)
            assert len(embed.embeddings[0].values) > 0
            _replace(cluster, worker, payload_key_file=str(early))
            with pytest.raises(grpc.RpcError) as err:
                stub.Embed(pb.EmbedRequest(texts=["rotation 2"]), timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        message = err.value.details() or ""
        assert "the worker cannot read the request" in message
        assert "payload key id 'old' is unknown here (this process has new)" in message
        assert "deploy the same key file" in message
        ((_, dead),) = r.xrange(keys.DEAD_LETTER_STREAM)
        assert b"payload key id 'old'" in dead[b"reason"]
        assert b"field:sealed" in dead and b"field:texts" not in dead  # still ciphertext
        assert (
            PayloadCipher.from_file(step1)
            .open(
                dead[b"field:sealed"], "job", keys.task_stream("embed"), dead[b"field:id"].decode()
            )
            .startswith(b'{"texts": ["rotation 2"]')
        )
        assert serving(cluster.procs[-1].address)  # the worker lives on


def _replace(cluster: Cluster, worker: Proc, **env: str) -> Proc:
    """Stop `worker` and start another with `env` in its place."""
    worker.stop()
    fresh = cluster.start_worker(**env)
    wait_until(lambda: serving(fresh.address), 60, "replacement worker SERVING")
    return fresh


# --- (c) bad key files at start ------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "cannot read it (No such file or directory)"),
        ("k1:%%%notbase64\n", "line 1: the key of 'k1' is not valid base64"),
        ("k1:c2hvcnQ=\n", "line 1: the key of 'k1' is 5 bytes; AES-256 needs 32"),
    ],
    ids=["missing", "bad-base64", "wrong-length"],
)
@pytest.mark.parametrize("part", ["worker", "gateway"])
def test_a_bad_key_file_stops_the_process_at_start(
    model_repo: Path, tmp_path: Path, part: str, content: str | None, complaint: str
) -> None:
    path = tmp_path / "payload.keys"
    if content is not None:
        path.write_text(content)
    with Cluster(model_repo, tmp_path) as cluster:  # no Redis: the settings fail first
        if part == "worker":
            proc = cluster.start_worker(payload_key_file=str(path))
        else:
            proc = cluster.start_gateway(payload_key_file=str(path))[0]
        assert proc.popen.wait(60) != 0
    assert f"TASKMUX_PAYLOAD_KEY_FILE={path}" in proc.output()
    assert complaint in proc.output()
