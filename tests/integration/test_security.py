"""TLS, mutual TLS and API keys on a real gateway, with certificates made at test time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.auth import hash_key, load_keys
from gateway.settings import GatewaySettings
from taskmux.cli import main as cli_main
from taskmux.config import SettingsError
from taskmux.local import free_port
from tests.certs import Pem, Pki, make_pki
from tests.harness import Cluster, Proc, health_status, serving, wait_until

pytestmark = pytest.mark.integration

EMBED_KEY = "embed-only-key-0123456789"
ALL_KEY = "all-heads-key-9876543210"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _channel(address: str, pki: Pki, client: Pem | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(address, credentials)


def _serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return False
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def _catalog_ready(
    stub: taskmux_pb2_grpc.TaskMuxStub, metadata: tuple[tuple[str, str], ...]
) -> bool:
    try:
        heads = stub.ListTasks(pb.ListTasksRequest(), timeout=5, metadata=metadata).heads
    except grpc.RpcError:
        return False
    return bool(heads)


@pytest.fixture(scope="module")
def tls_gateway(cluster: Cluster, pki: Pki) -> tuple[Proc, str]:
    """A TLS gateway with API keys: one tenant may only embed, the other may use any head."""
    keys = pki.dir / "keys.json"
    tenants = {
        "acme": {"key_sha256": hash_key(EMBED_KEY), "heads": ["embed"]},
        "globex": {"key_sha256": hash_key(ALL_KEY)},
    }
    keys.write_text(json.dumps({"tenants": tenants}))
    proc, address = cluster.start_gateway(
        tls_cert_file=str(pki.dir / "server.pem"),
        tls_key_file=str(pki.dir / "server.key"),
        api_keys_file=str(keys),
    )
    with _channel(address, pki) as channel:
        wait_until(lambda: _serving(channel), 30, "TLS gateway SERVING")
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        metadata = (("authorization", f"Bearer {ALL_KEY}"),)
        wait_until(
            lambda: _catalog_ready(stub, metadata), 60, "the catalog through the TLS gateway"
        )
    return proc, address


@pytest.fixture(scope="module")
def mtls_gateway(cluster: Cluster, pki: Pki) -> str:
    _, address = cluster.start_gateway(
        tls_cert_file=str(pki.dir / "server.pem"),
        tls_key_file=str(pki.dir / "server.key"),
        tls_client_ca_file=str(pki.dir / "ca.pem"),
    )
    with _channel(address, pki, pki.client) as channel:
        wait_until(lambda: _serving(channel), 30, "mTLS gateway SERVING")
    return address


@pytest.fixture
def tls_stub(tls_gateway: tuple[Proc, str], pki: Pki) -> Iterator[taskmux_pb2_grpc.TaskMuxStub]:
    with _channel(tls_gateway[1], pki) as channel:
        yield taskmux_pb2_grpc.TaskMuxStub(channel)


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = info.value.code()
    return code


def test_tls_with_trusting_client_and_valid_key(tls_stub: taskmux_pb2_grpc.TaskMuxStub) -> None:
    response = tls_stub.Embed(
        pb.EmbedRequest(texts=["hi"]), timeout=30, metadata=_bearer(EMBED_KEY)
    )
    assert len(response.embeddings) == 1
    response2 = tls_stub.ListTasks(pb.ListTasksRequest(), timeout=10, metadata=_bearer(EMBED_KEY))
    assert response2.heads


def test_tls_rejects_plaintext_client(tls_gateway: tuple[Proc, str]) -> None:
    with grpc.insecure_channel(tls_gateway[1]) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        request = pb.ListTasksRequest()
        assert _code(lambda: stub.ListTasks(request, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_missing_key_is_unauthenticated(tls_stub: taskmux_pb2_grpc.TaskMuxStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        tls_stub.Embed(pb.EmbedRequest(texts=["hi"]), timeout=10)
    assert info.value.code() == UNAUTHENTICATED
    assert "authorization: Bearer" in (info.value.details() or "")


def test_bad_key_is_unauthenticated(tls_stub: taskmux_pb2_grpc.TaskMuxStub) -> None:
    request = pb.ListTasksRequest()
    code = _code(lambda: tls_stub.ListTasks(request, timeout=10, metadata=_bearer("nope")))
    assert code == UNAUTHENTICATED
    not_bearer = (("authorization", EMBED_KEY),)
    assert _code(lambda: tls_stub.ListTasks(request, timeout=10, metadata=not_bearer)) == (
        UNAUTHENTICATED
    )


def test_forbidden_head_is_permission_denied(tls_stub: taskmux_pb2_grpc.TaskMuxStub) -> None:
    request = pb.ClassifyRequest(head="sentiment", texts=["great"])
    code = _code(lambda: tls_stub.Classify(request, timeout=10, metadata=_bearer(EMBED_KEY)))
    assert code == DENIED


def test_analyze_with_forbidden_head_is_permission_denied(
    tls_stub: taskmux_pb2_grpc.TaskMuxStub,
) -> None:
    request = pb.AnalyzeRequest(texts=["great"], heads=["sentiment"])
    code = _code(lambda: list(tls_stub.Analyze(request, timeout=10, metadata=_bearer(EMBED_KEY))))
    assert code == DENIED


def test_pipeline_with_forbidden_head_is_permission_denied(
    tls_stub: taskmux_pb2_grpc.TaskMuxStub,
) -> None:
    requests = [
        pb.PipelineRequest(id="1", classify=pb.ClassifyRequest(head="sentiment", texts=["x"]))
    ]
    call = tls_stub.Pipeline(iter(requests), timeout=10, metadata=_bearer(EMBED_KEY))
    assert _code(lambda: list(call)) == DENIED


def test_health_stays_open(tls_gateway: tuple[Proc, str], pki: Pki) -> None:
    with _channel(tls_gateway[1], pki) as channel:
        assert _serving(channel)


def test_key_never_logged(
    tls_gateway: tuple[Proc, str], tls_stub: taskmux_pb2_grpc.TaskMuxStub
) -> None:
    tls_stub.ListTasks(pb.ListTasksRequest(), timeout=10, metadata=_bearer(EMBED_KEY))
    log = tls_gateway[0].output()
    assert "tenants loaded" in log
    assert EMBED_KEY not in log and ALL_KEY not in log


def test_mtls_without_client_cert_fails(mtls_gateway: str, pki: Pki) -> None:
    with _channel(mtls_gateway, pki) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        assert _code(lambda: stub.Check(request, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_untrusted_client_cert_fails(mtls_gateway: str, pki: Pki) -> None:
    with _channel(mtls_gateway, pki, pki.rogue_client) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        assert _code(lambda: stub.Check(request, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_trusted_client_cert_succeeds(mtls_gateway: str, pki: Pki) -> None:
    with _channel(mtls_gateway, pki, pki.client) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        response = stub.Embed(pb.EmbedRequest(texts=["hi"]), timeout=30)
        assert len(response.embeddings) == 1


def test_plaintext_gateway_warns_no_auth(cluster: Cluster) -> None:
    proc, address = cluster.start_gateway()
    with grpc.insecure_channel(address) as channel:
        wait_until(lambda: _serving(channel), 30, "plaintext gateway SERVING")
    assert "NO AUTHENTICATION" in proc.output()


def test_keys_file_in_toml_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[tenants.acme]\nkey_sha256 = "{hash_key("k1")}"\nheads = ["embed"]\n')
    ring = load_keys(path)
    tenant = ring.tenant([("authorization", "Bearer k1")])
    assert tenant.name == "acme" and tenant.heads == frozenset({"embed"})
    path.write_text('[tenants.acme]\nkey_sha256 = "short"\n')
    with pytest.raises(SettingsError, match="64 hex"):
        load_keys(path)


def test_tls_settings_must_be_consistent() -> None:
    with pytest.raises(SettingsError, match="both"):
        GatewaySettings.from_env({"TASKMUX_TLS_CERT_FILE": "cert.pem"})
    with pytest.raises(SettingsError, match="mutual TLS"):
        GatewaySettings.from_env({"TASKMUX_TLS_CLIENT_CA_FILE": "ca.pem"})
    s = GatewaySettings.from_env(
        {"TASKMUX_TLS_CERT_FILE": "c", "TASKMUX_TLS_KEY_FILE": "k", "TASKMUX_API_KEYS_FILE": "f"}
    )
    assert s.transport() == "tls" and "auth=api-keys" in s.describe()


def test_keys_cli_prints_the_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "hash", "secret"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("secret")
    assert cli_main(["keys", "new", "--tenant", "acme", "--heads", "embed"]) == 0
    out = capsys.readouterr().out
    key = out.split("): ")[1].splitlines()[0]
    entry = json.loads(out.split("keys-file entry: ")[1])
    assert entry == {"acme": {"key_sha256": hash_key(key), "heads": ["embed"]}}


def test_plaintext_probe_port_serves_health_only(cluster: Cluster, pki: Pki) -> None:
    """With TLS on the API port, kubelet's plaintext gRPC probes use TASKMUX_HEALTH_ADDR;
    that port answers health and nothing else."""
    probe = f"127.0.0.1:{free_port()}"
    _, address = cluster.start_gateway(
        tls_cert_file=str(pki.dir / "server.pem"),
        tls_key_file=str(pki.dir / "server.key"),
        health_addr=probe,
    )
    wait_until(lambda: serving(probe), 30, "health on the plaintext probe port")
    liveness = health_status(probe, "liveness")
    assert liveness == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(probe) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        assert _code(lambda: stub.ListTasks(pb.ListTasksRequest(), timeout=5)) == (
            grpc.StatusCode.UNIMPLEMENTED
        )
    with grpc.insecure_channel(address) as channel:  # the API port still demands TLS
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        assert _code(lambda: stub.ListTasks(pb.ListTasksRequest(), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
