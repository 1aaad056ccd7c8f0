"""API keys and mutual TLS from the client side: both clients, the CLI and the load test.

One real gateway serves mutual TLS and a keys file; every call goes through the clients'
own channels and metadata, never hand-built stubs.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_client import (
    AsyncTaskMuxClient,
    Attempt,
    PermissionDeniedError,
    RetryPolicy,
    Task,
    TaskMuxClient,
    TaskMuxError,
    TLSConfig,
    UnauthenticatedError,
)

from gateway.auth import hash_key
from taskmux.cli import main as cli_main
from taskmux.loadtest import LoadConfig
from tests.certs import Pki, make_pki
from tests.harness import Cluster, require_node_client, wait_until

pytestmark = pytest.mark.integration

EMBED_KEY = "embed-only-key-client-side-0123"
ALL_KEY = "all-heads-key-client-side-4567"
BAD_KEY = "not-a-known-key-client-side-89"
LIMITED_KEY = "one-call-then-wait-key-client-7"
KEYS = (EMBED_KEY, ALL_KEY, BAD_KEY, LIMITED_KEY)
# Several attempts allowed, so a retried auth failure would show in the count.
RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    for name, key in [("embed.key", EMBED_KEY), ("all.key", ALL_KEY), ("bad.key", BAD_KEY)]:
        (pki.dir / name).write_text(key + "\n")  # a trailing newline, as editors leave one
    return pki


@pytest.fixture(scope="module")
def tls(pki: Pki) -> TLSConfig:
    return TLSConfig(pki.ca.cert, pki.client.cert, pki.client.key)


@pytest.fixture(scope="module")
def target(cluster: Cluster, pki: Pki) -> str:
    """A mutual-TLS gateway with keys: one tenant may only embed, the other any head."""
    keys = pki.dir / "keys.json"
    tenants = {
        "acme": {"key_sha256": hash_key(EMBED_KEY), "heads": ["embed"]},
        "globex": {"key_sha256": hash_key(ALL_KEY)},
        # One call, then a wait far longer than the test: the second call is refused.
        "initech": {"key_sha256": hash_key(LIMITED_KEY), "rate_per_s": 0.001, "burst": 1},
    }
    keys.write_text(json.dumps({"tenants": tenants}))
    _, address = cluster.start_gateway(
        tls_cert_file=str(pki.dir / "server.pem"),
        tls_key_file=str(pki.dir / "server.key"),
        tls_client_ca_file=str(pki.dir / "ca.pem"),
        api_keys_file=str(keys),
    )
    _wait_for_heads(address, pki)
    return address


def _wait_for_heads(address: str, pki: Pki) -> None:
    tls = TLSConfig(pki.ca.cert, pki.client.cert, pki.client.key)
    with TaskMuxClient(address, timeout_s=5, api_key=ALL_KEY, tls=tls) as client:

        def ready() -> bool:
            try:
                heads = {h.name for h in client.list_tasks().heads}
            except TaskMuxError:
                return False
            return {"embed", "sentiment"} <= heads

        wait_until(ready, 90, "the catalog through the mutual-TLS gateway")


def _tls_flags(pki: Pki) -> list[str]:
    d = pki.dir
    return [
        "--tls",
        f"--ca-file={d / 'ca.pem'}",
        f"--cert-file={d / 'client.pem'}",
        f"--key-file={d / 'client.key'}",
    ]


def _assert_no_key(*texts: str) -> None:
    for text in texts:
        for key in KEYS:
            assert key not in text


# --- the clients ---------------------------------------------------------------------------


def test_sync_client_with_a_key_over_mtls(target: str, tls: TLSConfig) -> None:
    with TaskMuxClient(target, timeout_s=30, api_key=ALL_KEY, tls=tls) as client:
        assert len(client.embed(["hello"]).embeddings) == 1
        results = list(client.analyze(["a film I loved"], ["embed", "sentiment"]))
        assert sorted(r.head for r in results) == ["embed", "sentiment"]
        tasks: list[Task] = [
            pb.EmbedRequest(texts=["x"]),
            pb.ClassifyRequest(head="sentiment", texts=["ok"]),
        ]
        responses = list(client.pipeline(tasks))
        assert sorted(r.id for r in responses) == ["0", "1"]
        assert not any(r.HasField("error") for r in responses)
        _assert_no_key(repr(client), repr(tls))


async def test_async_client_with_a_key_over_mtls(target: str, tls: TLSConfig) -> None:
    async with AsyncTaskMuxClient(target, timeout_s=30, api_key=ALL_KEY, tls=tls) as client:
        assert len((await client.embed(["hello"])).embeddings) == 1
        results = [r async for r in client.analyze(["a film I loved"], ["sentiment"])]
        assert [r.head for r in results] == ["sentiment"]
        responses = [r async for r in client.pipeline([pb.EmbedRequest(texts=["x"])])]
        assert len(responses) == 1 and not responses[0].HasField("error")


def test_a_bad_key_is_unauthenticated_and_never_retried(target: str, tls: TLSConfig) -> None:
    attempts: list[Attempt] = []
    client = TaskMuxClient(
        target, api_key=BAD_KEY, tls=tls, retry=RETRY, on_attempt=attempts.append
    )
    with client:
        with pytest.raises(UnauthenticatedError) as info:
            client.embed(["hello"])
        assert [a.number for a in attempts] == [1] and info.value.attempts == 1
        assert info.value.details() == "invalid API key"
        _assert_no_key(str(info.value), repr(info.value))
        attempts.clear()
        with pytest.raises(UnauthenticatedError):
            list(client.analyze(["hello"], ["sentiment"]))
        assert len(attempts) == 1


async def test_no_key_is_unauthenticated_for_the_async_client(target: str, tls: TLSConfig) -> None:
    attempts: list[Attempt] = []
    async with AsyncTaskMuxClient(
        target, tls=tls, retry=RETRY, on_attempt=attempts.append
    ) as client:
        with pytest.raises(UnauthenticatedError):
            await client.list_tasks()
    assert len(attempts) == 1


def test_a_forbidden_head_is_permission_denied(target: str, tls: TLSConfig) -> None:
    attempts: list[Attempt] = []
    client = TaskMuxClient(
        target, api_key=EMBED_KEY, tls=tls, retry=RETRY, on_attempt=attempts.append
    )
    with client, pytest.raises(PermissionDeniedError) as info:
        client.classify("sentiment", ["great"])
    assert len(attempts) == 1 and "sentiment" in info.value.details()


async def test_a_forbidden_head_ends_an_async_pipeline(target: str, tls: TLSConfig) -> None:
    tasks = [pb.ClassifyRequest(head="sentiment", texts=["great"])]
    async with AsyncTaskMuxClient(target, api_key=EMBED_KEY, tls=tls) as client:
        with pytest.raises(PermissionDeniedError):
            _ = [r async for r in client.pipeline(tasks)]


def test_malformed_keys_are_refused_without_being_shown() -> None:
    for key in ("two words", "line\nbreak", "", "clé"):
        with pytest.raises(ValueError) as info:
            TaskMuxClient("127.0.0.1:1", api_key=key)
        assert key not in str(info.value) or not key
    with pytest.raises(ValueError, match="not both"):
        TaskMuxClient("127.0.0.1:1", tls=True, credentials=TLSConfig().credentials())


def test_load_config_keeps_the_key_out_of_repr_and_report(tls: TLSConfig) -> None:
    config = LoadConfig(api_key=ALL_KEY, tls=tls)
    _assert_no_key(repr(config), json.dumps(config.to_dict()))
    assert config.to_dict()["api_key_set"] is True and config.to_dict()["tls"] is True


# --- the CLI -------------------------------------------------------------------------------


def test_cli_embed_and_tasks_with_a_key_file_over_mtls(
    target: str, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--target", target, "--api-key-file", str(pki.dir / "all.key"), *_tls_flags(pki)]
    assert cli_main(["embed", *common, "hello"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["embeddings"]) == 1
    _assert_no_key(out, err)
    assert cli_main(["tasks", *common]) == 0
    out, err = capsys.readouterr()
    assert "sentiment" in {h["name"] for h in json.loads(out)["heads"]}
    _assert_no_key(out, err)


def test_cli_with_a_bad_key_prints_one_line_and_fails(
    target: str, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tasks", "--target", target, "--api-key-file", str(pki.dir / "bad.key")]
    assert cli_main([*argv, *_tls_flags(pki)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "error: UNAUTHENTICATED: invalid API key\n"
    _assert_no_key(out, err)


def test_cli_takes_the_key_from_the_environment(
    target: str, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKMUX_API_KEY", EMBED_KEY)
    argv = ["classify", "--target", target, "--head", "sentiment", *_tls_flags(pki), "great"]
    assert cli_main(argv) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: PERMISSION_DENIED: ") and err.count("\n") == 1
    _assert_no_key(out, err)


def test_cli_refuses_unusable_options_in_one_line(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(pki.dir / "missing.key")
    assert cli_main(["tasks", "--api-key-file", missing]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read API key file {missing}: ")
    assert cli_main(["tasks", "--cert-file", str(pki.dir / "client.pem")]) == 2
    assert "go together" in capsys.readouterr().err


def test_loadtest_with_a_key_and_mtls(
    target: str, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "loadtest",
        "--target",
        target,
        "--requests",
        "6",
        "--warmup",
        "0",
        "--concurrency",
        "2",
        "--connections",
        "1",
        "--mix",
        "embed,analyze:embed+sentiment",
        "--quiet",
        "--json",
        "-",
        "--api-key-file",
        str(pki.dir / "all.key"),
        *_tls_flags(pki),
    ]
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["ok"] == 6 and report["errors"] == 0
    _assert_no_key(out, err)


# --- another language ----------------------------------------------------------------------


def test_a_grpc_js_client_with_mtls_keys_and_retry_hints(target: str, pki: Pki) -> None:
    """grpc-js, from protos/ alone: mutual TLS, bearer keys, and the retry hint of a
    rate-limited call, read from the trailers as any gRPC client can."""
    node_client = require_node_client()
    env = {
        **os.environ,
        "TASKMUX_API_KEY": ALL_KEY,
        "TASKMUX_BAD_KEY": BAD_KEY,
        "TASKMUX_LIMITED_KEY": LIMITED_KEY,
    }
    run = subprocess.run(
        ["node", str(node_client / "client.mjs"), target, "--secure", str(pki.dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert [len(e["values"]) for e in out["embed"]["embeddings"]] == [384, 384]
    assert out["classify"]["results"][0]["label"] == "positive"
    assert out["empty"]["code"] == "INVALID_ARGUMENT"
    assert out["unknown"]["code"] == "NOT_FOUND"
    assert out["no_key"]["code"] == "UNAUTHENTICATED"
    assert out["bad_key"]["code"] == "UNAUTHENTICATED"
    assert len(out["limited_first"]["embeddings"]) == 1
    assert out["limited_second"]["code"] == "RESOURCE_EXHAUSTED"
    assert int(out["limited_second"]["retry_after_ms"]) > 0
    _assert_no_key(run.stdout, run.stderr)
