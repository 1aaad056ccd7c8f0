"""`taskmux keys`: make API keys and the hashed lines the gateway's keys file holds."""

from __future__ import annotations

import argparse
import json
import secrets

from gateway.auth import hash_key


def add_keys_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `taskmux keys hash` and `taskmux keys new`."""
    keys = sub.add_parser("keys", help="Make API keys for TASKMUX_API_KEYS_FILE")
    actions = keys.add_subparsers(required=True, metavar="ACTION")
    hash_cmd = actions.add_parser("hash", help="Print the key_sha256 of an existing key")
    hash_cmd.add_argument("key")
    hash_cmd.set_defaults(func=_hash)
    new = actions.add_parser("new", help="Make a random key; print it and its keys-file entry")
    new.add_argument("--tenant", required=True)
    new.add_argument("--heads", default="", help="comma-separated heads allowed (default: all)")
    new.set_defaults(func=_new)


def _hash(args: argparse.Namespace) -> int:
    print(hash_key(args.key))
    return 0


def _new(args: argparse.Namespace) -> int:
    key = secrets.token_urlsafe(32)
    entry: dict[str, object] = {"key_sha256": hash_key(key)}
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if heads:
        entry["heads"] = heads
    print(f"key (give it to the tenant; it is not stored anywhere): {key}")
    print(f"keys-file entry: {json.dumps({args.tenant: entry})}")
    return 0
