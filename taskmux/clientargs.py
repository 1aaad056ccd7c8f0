"""The connection, API key and TLS options of every command that calls a gateway.

There is deliberately no `--api-key KEY` flag: a key on the command line shows in `ps`
and in the shell's history. The key comes from `--api-key-file`, else TASKMUX_API_KEY,
else the file named by TASKMUX_API_KEY_FILE.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from taskmux_client.channel import TLSConfig, auth_metadata, read_api_key

API_KEY_ENV = "TASKMUX_API_KEY"
API_KEY_FILE_ENV = "TASKMUX_API_KEY_FILE"
TARGET_ENV = "TASKMUX_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"


class ClientOptionsError(Exception):
    """Options that cannot be used; the message is one line for the user, never the key."""


@dataclass(frozen=True)
class ClientSecurity:
    """What the options ask for: the API key (None: send none) and TLS (None: plaintext)."""

    api_key: str | None = field(default=None, repr=False)
    tls: TLSConfig | None = None


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --target, --timeout and the security options of a command that calls a gateway."""
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
        help=f"gateway address (${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of each call in seconds (30)"
    )
    add_client_arguments(parser)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --api-key-file, --tls, --ca-file, --cert-file and --key-file to `parser`."""
    group = parser.add_argument_group("security")
    group.add_argument(
        "--api-key-file",
        metavar="PATH",
        help=f"file holding the API key (else ${API_KEY_ENV}, else ${API_KEY_FILE_ENV})",
    )
    group.add_argument(
        "--tls", action="store_true", help="connect with TLS (implied by the files below)"
    )
    group.add_argument(
        "--ca-file", metavar="PEM", help="CA that signed the gateway's certificate (else system)"
    )
    group.add_argument("--cert-file", metavar="PEM", help="client certificate, for mutual TLS")
    group.add_argument("--key-file", metavar="PEM", help="key of the client certificate")


def security_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ClientSecurity:
    """The key and TLS settings the options and environment name; raises ClientOptionsError."""
    env = os.environ if environ is None else environ
    return ClientSecurity(api_key=_api_key(args, env), tls=_tls(args))


def _api_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    path: str | None = args.api_key_file
    if path:
        key, source = _read_key(path), path
    elif environ.get(API_KEY_ENV):
        key, source = environ[API_KEY_ENV], API_KEY_ENV
    elif environ.get(API_KEY_FILE_ENV):
        source = environ[API_KEY_FILE_ENV]
        key = _read_key(source)
    else:
        return None
    try:
        auth_metadata(key)
    except ValueError as err:
        raise ClientOptionsError(f"{source}: {err}") from None
    return key.strip()


def _read_key(path: str) -> str:
    try:
        return read_api_key(path)
    except OSError as err:
        raise ClientOptionsError(f"cannot read API key file {path}: {err.strerror}") from None
    except ValueError as err:
        raise ClientOptionsError(str(err)) from None


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    if not (args.tls or args.ca_file or args.cert_file or args.key_file):
        return None
    if bool(args.cert_file) != bool(args.key_file):
        raise ClientOptionsError("--cert-file and --key-file go together (mutual TLS)")
    try:
        return TLSConfig.from_files(args.ca_file, args.cert_file, args.key_file)
    except OSError as err:
        raise ClientOptionsError(f"cannot read {err.filename}: {err.strerror}") from None
