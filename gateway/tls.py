"""The gateway's listening port: plaintext, TLS, or mutual TLS, by settings.

The certificate, its key and the client CA bundle are re-read when their files change,
without a restart: grpcio asks `CertificateFiles.fetch` before every new TLS handshake,
and it answers a new configuration only when a file's identity (inode, size, mtime of the
resolved path, so a Kubernetes Secret volume's symlink swap counts) and its content have
changed. Connections already open keep the certificate they were made with until they
reconnect (at most `max_connection_age_s`). Files that do not form a valid certificate
and key (a half-written rotation, a key of another certificate) are refused with an error
in the log, and the last good configuration keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.settings import GatewaySettings
from taskmux.config import SettingsError

log = logging.getLogger(__name__)

# What identifies a file's current version without reading it: (device, inode, size, mtime).
Signature = tuple[int, int, int, int]


def add_port(server: grpc.aio.Server, settings: GatewaySettings) -> int:
    """Bind `settings.listen_addr` with the transport the settings ask for; the port."""
    if not settings.tls_cert_file:
        log.warning(
            "plaintext gRPC on %s: set TASKMUX_TLS_CERT_FILE and TASKMUX_TLS_KEY_FILE "
            "for TLS outside local development",
            settings.listen_addr,
        )
        return server.add_insecure_port(settings.listen_addr)
    files = CertificateFiles(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    # grpcio documents a fetcher's None as "no change"; grpc-stubs leave None out.
    credentials = grpc.dynamic_ssl_server_credentials(
        files.initial(),
        files.fetch,  # type: ignore[arg-type]
        require_client_authentication=files.mutual,
    )
    mode = "mutual TLS (client certificate required)" if files.mutual else "TLS"
    log.info("serving %s on %s", mode, settings.listen_addr)
    return server.add_secure_port(settings.listen_addr, credentials)


@dataclass(frozen=True)
class _Pems:
    """One consistent reading of the TLS files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )


class CertificateFiles:
    """The server's TLS files, re-read when they change; `fetch` is grpcio's callback."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self._cert = Path(cert_file)
        self._key = Path(key_file)
        self._client_ca = Path(client_ca_file) if client_ca_file else None
        self.mutual = self._client_ca is not None
        self._lock = threading.Lock()  # grpcio may call fetch from several threads
        self._signature: tuple[Signature, ...] = ()
        self._current: _Pems | None = None

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration to start with; SettingsError if the files are not valid."""
        with self._lock:
            signature = self._stat()
            pems = self._read()
            self._signature, self._current = signature, pems
        log.info("TLS certificate %s loaded from %s", _fingerprint(pems.cert), self._cert)
        return pems.configuration()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if the files changed and are valid; None keeps the current."""
        with self._lock:
            try:
                signature = self._stat()
            except SettingsError as err:
                if self._signature != ():
                    log.error("TLS files: %s; still serving the last good certificate", err)
                    self._signature = ()
                return None
            if signature == self._signature:
                return None
            self._signature = signature
            try:
                pems = self._read()
            except SettingsError as err:
                log.error("TLS files changed but %s; still serving the last good certificate", err)
                return None
            if pems == self._current:
                return None
            self._current = pems
        log.info("TLS certificate %s reloaded from %s", _fingerprint(pems.cert), self._cert)
        return pems.configuration()

    def _paths(self) -> list[Path]:
        return [self._cert, self._key, *([self._client_ca] if self._client_ca else [])]

    def _stat(self) -> tuple[Signature, ...]:
        signatures = []
        for path in self._paths():
            try:
                st = os.stat(path)  # follows symlinks: the file they resolve to now
            except OSError as err:
                raise SettingsError(f"cannot read {path}: {err}") from None
            signatures.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(signatures)

    def _read(self) -> _Pems:
        """The files' content, checked to be a certificate with its own key (and a CA
        bundle); SettingsError otherwise."""
        cert, key = _read(self._cert), _read(self._key)
        client_ca = _read(self._client_ca) if self._client_ca else None
        try:
            # Parses both and checks that the key belongs to the certificate.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self._cert, self._key)
        except (ssl.SSLError, OSError) as err:
            raise SettingsError(
                f"{self._cert} and {self._key} are not a certificate and its key: {err}"
            ) from None
        if client_ca is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                    cadata=client_ca.decode("ascii")
                )
            except (ssl.SSLError, ValueError) as err:
                raise SettingsError(f"{self._client_ca} is not a PEM CA bundle: {err}") from None
        if (_read(self._cert), _read(self._key)) != (cert, key):
            # Rewritten while being checked: what was checked may not be what was read.
            raise SettingsError(f"{self._cert} or {self._key} changed while being read")
        return _Pems(cert, key, client_ca)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SettingsError(f"cannot read {path}: {err}") from None


def _fingerprint(cert_pem: bytes) -> str:
    """The start of the SHA-256 of the (first) certificate, to tell versions apart in logs."""
    text = cert_pem.decode("ascii", errors="replace")
    end = text.find(ssl.PEM_FOOTER)
    try:
        der = ssl.PEM_cert_to_DER_cert(text[: end + len(ssl.PEM_FOOTER)])
    except ValueError:
        return "(unparsed)"
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]
