"""The gateway's listening port: plaintext, TLS, or mutual TLS, by settings."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from gateway.settings import GatewaySettings
from taskmux.config import SettingsError

log = logging.getLogger(__name__)


def add_port(server: grpc.aio.Server, settings: GatewaySettings) -> int:
    """Bind `settings.listen_addr` with the transport the settings ask for; the port."""
    if not settings.tls_cert_file:
        log.warning(
            "plaintext gRPC on %s: set TASKMUX_TLS_CERT_FILE and TASKMUX_TLS_KEY_FILE "
            "for TLS outside local development",
            settings.listen_addr,
        )
        return server.add_insecure_port(settings.listen_addr)
    credentials = grpc.ssl_server_credentials(
        [(_read(settings.tls_key_file), _read(settings.tls_cert_file))],
        root_certificates=_read(settings.tls_client_ca_file)
        if settings.tls_client_ca_file
        else None,
        require_client_auth=bool(settings.tls_client_ca_file),
    )
    mode = "mutual TLS (client certificate required)" if settings.tls_client_ca_file else "TLS"
    log.info("serving %s on %s", mode, settings.listen_addr)
    return server.add_secure_port(settings.listen_addr, credentials)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SettingsError(f"cannot read {path}: {err}") from None
