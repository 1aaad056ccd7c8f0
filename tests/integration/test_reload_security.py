"""TLS certificates and API keys replaced on disk while a real gateway runs.

Files change the way a Kubernetes Secret volume changes them: each file is a symlink
through `..data` to a timestamped folder, and an update swaps `..data` in one rename.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.auth import KeysFile, hash_key
from gateway.tls import CertificateFiles
from taskmux.config import SettingsError
from taskmux.devcerts import Pem, issue, pem
from tests.harness import Cluster, Proc, wait_until

pytestmark = pytest.mark.integration

KEY_A = "tenant-a-key-0123456789abcdef"
KEY_B = "tenant-b-key-0123456789abcdef"
KEY_C = "tenant-c-key-0123456789abcdef"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
RELOAD_WAIT_S = 15  # generous: the gateway checks the keys file about once a second
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]


class SecretVolume:
    """A folder laid out like a mounted Kubernetes Secret, updated by a `..data` swap."""

    _versions = itertools.count()

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, files: dict[str, bytes]) -> None:
        """Publish a new version holding exactly `files`, atomically."""
        version = self.root / f"..version_{next(self._versions)}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        staging = self.root / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)


@dataclass
class Generation:
    """One CA with the server and client certificates it signed."""

    ca: Pem
    server: Pem
    client: Pem

    @classmethod
    def make(cls, name: str) -> Generation:
        ca = issue(f"{name} CA", None, ca=True)
        return cls(
            pem(ca),
            pem(issue("localhost", ca, server=True)),
            pem(issue(f"{name} client", ca, client=True)),
        )

    def files(self, *, with_ca: bool = True) -> dict[str, bytes]:
        """The files cert-manager puts in a TLS Secret."""
        files = {"tls.crt": self.server.cert, "tls.key": self.server.key}
        return {**files, "ca.crt": self.ca.cert} if with_ca else files


def _channel(address: str, ca: bytes, client: Pem | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    # A connection of its own, not one shared with an earlier channel: each channel
    # here must make its own TLS handshake.
    return grpc.secure_channel(address, credentials, options=LOCAL_POOL)


def _check(channel: grpc.Channel) -> bool:
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    except grpc.RpcError:
        return False
    return bool(status.status == health_pb2.HealthCheckResponse.SERVING)


def _handshake(address: str, ca: bytes, client: Pem | None = None) -> bool:
    """Whether a new connection that trusts `ca` (and presents `client`) is served."""
    with _channel(address, ca, client) as channel:
        return _check(channel)


def _tls_env(volume: SecretVolume, *, mutual: bool) -> dict[str, str]:
    env = {
        "tls_cert_file": str(volume.path("tls.crt")),
        "tls_key_file": str(volume.path("tls.key")),
    }
    return {**env, "tls_client_ca_file": str(volume.path("ca.crt"))} if mutual else env


def test_certificates_and_client_ca_rotate_without_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    one, two = Generation.make("first"), Generation.make("second")
    volume = SecretVolume(tmp_path / "tls")
    volume.write(one.files())
    proc, address = cluster.start_gateway(**_tls_env(volume, mutual=True))
    wait_until(lambda: _handshake(address, one.ca.cert, one.client), 30, "mTLS gateway")
    with _channel(address, one.ca.cert, one.client) as before:
        assert _check(before)
        volume.write(two.files())
        wait_until(
            lambda: _handshake(address, two.ca.cert, two.client),
            RELOAD_WAIT_S,
            "the second CA's certificates accepted on a new connection",
        )
        assert not _handshake(address, one.ca.cert, one.client), "old server certificate"
        assert not _handshake(address, two.ca.cert, one.client), "old CA's client certificate"
        # A connection made before the rotation keeps its session until it reconnects.
        assert _check(before)
    assert proc.popen.poll() is None
    assert "TLS certificate sha256:" in proc.output() and "reloaded from" in proc.output()


def test_invalid_certificate_keeps_the_last_good_one(cluster: Cluster, tmp_path: Path) -> None:
    one, two = Generation.make("first"), Generation.make("second")
    volume = SecretVolume(tmp_path / "tls")
    volume.write(one.files(with_ca=False))
    proc, address = cluster.start_gateway(**_tls_env(volume, mutual=False))
    wait_until(lambda: _handshake(address, one.ca.cert), 30, "TLS gateway")
    # A certificate with the key of another: what a half-done rotation could leave.
    volume.write({"tls.crt": two.server.cert, "tls.key": one.server.key})
    wait_until(
        lambda: (
            _handshake(address, one.ca.cert) and "not a certificate and its key" in proc.output()
        ),
        RELOAD_WAIT_S,
        "the mismatched pair refused, the first certificate still served",
    )
    assert not _handshake(address, two.ca.cert)
    volume.write(two.files(with_ca=False))
    wait_until(lambda: _handshake(address, two.ca.cert), RELOAD_WAIT_S, "the fixed pair")


# --- API keys ------------------------------------------------------------------------------


def _keys_json(**tenants: str) -> bytes:
    entries = {name: {"key_sha256": hash_key(key)} for name, key in tenants.items()}
    return json.dumps({"tenants": entries}).encode()


def _call(address: str, ca: bytes, key: str) -> grpc.StatusCode:
    """The status of a ListTasks call with `key`."""
    with _channel(address, ca) as channel:
        stub = taskmux_pb2_grpc.TaskMuxStub(channel)
        try:
            stub.ListTasks(
                pb.ListTasksRequest(), timeout=5, metadata=(("authorization", f"Bearer {key}"),)
            )
        except grpc.RpcError as err:
            code: grpc.StatusCode = err.code()
            return code
    return grpc.StatusCode.OK


@pytest.fixture
def keyed(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Proc, str, bytes, SecretVolume]]:
    """A TLS gateway whose keys file (a Secret volume) holds tenant a only."""
    pki = Generation.make("keys")
    tls = SecretVolume(tmp_path / "tls")
    tls.write(pki.files(with_ca=False))
    keys = SecretVolume(tmp_path / "keys")
    keys.write({"keys.json": _keys_json(a=KEY_A)})
    proc, address = cluster.start_gateway(
        **_tls_env(tls, mutual=False), api_keys_file=str(keys.path("keys.json"))
    )
    ok = grpc.StatusCode.OK
    wait_until(lambda: _call(address, pki.ca.cert, KEY_A) == ok, 60, "tenant a served")
    yield proc, address, pki.ca.cert, keys
    proc.stop()


def test_keys_file_reload_adds_and_removes_tenants(
    keyed: tuple[Proc, str, bytes, SecretVolume],
) -> None:
    proc, address, ca, keys = keyed
    assert _call(address, ca, KEY_B) == UNAUTHENTICATED
    keys.write({"keys.json": _keys_json(a=KEY_A, b=KEY_B)})
    wait_until(lambda: _call(address, ca, KEY_B) == grpc.StatusCode.OK, RELOAD_WAIT_S, "b added")
    keys.write({"keys.json": _keys_json(b=KEY_B, c=KEY_C)})
    wait_until(lambda: _call(address, ca, KEY_C) == grpc.StatusCode.OK, RELOAD_WAIT_S, "c added")
    assert _call(address, ca, KEY_A) == UNAUTHENTICATED  # removed in the same swap
    assert _call(address, ca, KEY_B) == grpc.StatusCode.OK
    assert proc.popen.poll() is None
    log = proc.output()
    assert "added ['c'], removed ['a']" in log
    assert KEY_A not in log and KEY_B not in log and KEY_C not in log


def test_corrupt_keys_file_keeps_the_last_good_keys(
    keyed: tuple[Proc, str, bytes, SecretVolume],
) -> None:
    proc, address, ca, keys = keyed
    keys.write({"keys.json": b'{"tenants": {"b": '})  # cut short
    # Calls are what make the gateway look at the file.
    wait_until(
        lambda: (
            _call(address, ca, KEY_A) == grpc.StatusCode.OK
            and "API keys not reloaded" in proc.output()
        ),
        RELOAD_WAIT_S,
        "the error logged, tenant a still served",
    )
    assert _call(address, ca, KEY_B) == UNAUTHENTICATED
    assert _call(address, ca, "") == UNAUTHENTICATED  # never "no authentication"
    # Rewritten in place (same inode, new content), not swapped: noticed too.
    keys.path("keys.json").write_bytes(_keys_json(b=KEY_B))
    wait_until(lambda: _call(address, ca, KEY_B) == grpc.StatusCode.OK, RELOAD_WAIT_S, "b")
    assert _call(address, ca, KEY_A) == UNAUTHENTICATED


# --- the reloading objects on their own ----------------------------------------------------


def test_keys_file_survives_bad_versions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(_keys_json(a=KEY_A))
    keys = KeysFile(path, check_interval_s=0)
    bearer = [("authorization", f"Bearer {KEY_A}")]
    with caplog.at_level(logging.INFO, logger="gateway.auth"):
        path.write_text("not json at all, and longer than before")
        assert keys.current().tenant(bearer).name == "a"
        path.unlink()
        assert keys.current().tenant(bearer).name == "a"
        assert keys.current().tenant(bearer).name == "a"
        path.write_bytes(_keys_json(bb=KEY_B))  # another size than the first version
        assert keys.current().names() == {"bb"}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors  # the bad file once, the missing file once
    assert "keeping the last good keys" in errors[0] and "No such file" in errors[1]
    with pytest.raises(SettingsError, match="cannot read API keys file"):
        KeysFile(tmp_path / "absent.json")


def test_certificate_files_answer_only_changes(tmp_path: Path) -> None:
    one, two = Generation.make("first"), Generation.make("second")
    volume = SecretVolume(tmp_path / "tls")
    volume.write({"tls.crt": one.server.cert, "tls.key": two.server.key})
    files = CertificateFiles(str(volume.path("tls.crt")), str(volume.path("tls.key")))
    with pytest.raises(SettingsError, match="not a certificate and its key"):
        files.initial()
    volume.write(one.files(with_ca=False))
    assert files.initial() is not None
    assert files.fetch() is None  # unchanged
    volume.write(one.files(with_ca=False))  # same content, new files
    assert files.fetch() is None
    volume.write({"tls.crt": b"garbage", "tls.key": one.server.key})
    assert files.fetch() is None  # refused: the last good one stays
    volume.write(two.files(with_ca=False))
    assert files.fetch() is not None
    assert files.fetch() is None
