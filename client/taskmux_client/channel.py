"""How a client connects: channel options, TLS credentials and the API key metadata.

The blocking and asyncio clients (and `taskmux loadtest`) all build their channels and
their call metadata here, so the two clients cannot drift apart on security.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from taskmux_client.retry import RetryPolicy

# Fail fast on a dead connection and reconnect about as often as the policy retries:
# gRPC's own reconnect backoff (1 s growing to 120 s) would otherwise make every retry
# fail at once while the channel waits to reconnect.
MIN_RECONNECT_MS = 100

AUTH_METADATA = "authorization"
Metadata = tuple[tuple[str, str], ...]
Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the gateway: the CAs to trust and, for mutual TLS, the client's certificate."""

    # PEM CA bundle that signed the gateway's certificate; None trusts the system's roots.
    root_certificates: bytes | None = None
    # PEM client certificate chain, for a gateway that requires mutual TLS.
    certificate_chain: bytes | None = None
    # PEM key of that certificate; left out of the repr.
    private_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key")

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
    ) -> TLSConfig:
        """Read the PEM files that are given; raises OSError for one that cannot be read."""
        return cls(
            root_certificates=_read(ca_file),
            certificate_chain=_read(cert_file),
            private_key=_read(key_file),
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """These settings as gRPC channel credentials."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def channel_options(policy: RetryPolicy, extra: Options) -> list[tuple[str, Any]]:
    """Reconnect backoff bounded by the policy's; `extra` options override these."""
    max_ms = max(int(policy.max_backoff_s * 1000), MIN_RECONNECT_MS)
    options: dict[str, Any] = {
        "grpc.initial_reconnect_backoff_ms": MIN_RECONNECT_MS,
        "grpc.min_reconnect_backoff_ms": MIN_RECONNECT_MS,
        "grpc.max_reconnect_backoff_ms": max_ms,
    }
    options.update(dict(extra))
    return list(options.items())


def channel_credentials(
    tls: bool | TLSConfig, credentials: grpc.ChannelCredentials | None
) -> grpc.ChannelCredentials | None:
    """The transport credentials for `tls` or ready `credentials`; None means plaintext."""
    if credentials is not None:
        if tls is not False:
            raise ValueError("pass tls or credentials, not both")
        return credentials
    if tls is False:
        return None
    return (TLSConfig() if tls is True else tls).credentials()


def auth_metadata(api_key: str | None) -> Metadata:
    """The metadata that carries `api_key` on every call; empty without a key.

    A malformed key is refused here rather than by gRPC, whose error could quote it.
    """
    if api_key is None:
        return ()
    key = api_key.strip()
    if not key or not key.isascii() or not key.isprintable() or " " in key:
        raise ValueError("api_key must be one word of printable ASCII (the key is not shown)")
    return ((AUTH_METADATA, f"Bearer {key}"),)


def read_api_key(path: str | Path) -> str:
    """The API key kept in a file (surrounding whitespace dropped); raises OSError."""
    key = Path(path).read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"{path} holds no API key")
    return key


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Options
) -> grpc.Channel:
    """A blocking channel, secure when `credentials` are given."""
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def open_aio_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Options
) -> grpc.aio.Channel:
    """An asyncio channel, secure when `credentials` are given."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
