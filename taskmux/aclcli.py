"""`taskmux redis-acl`: print the gateway and worker Redis ACL users (router/acl.py)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from router.acl import GATEWAY, WORKER, AclUser, aclfile_line, password_hash, setuser_args

# Not a valid rule, so that a line whose placeholder was not replaced is refused.
PLACEHOLDER = "#<sha256-of-password>"


def add_redis_acl_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `taskmux redis-acl`."""
    cmd = sub.add_parser(
        "redis-acl",
        help="Print the least-privilege Redis ACL users for gateways and workers",
        description="Print the taskmux-gateway and taskmux-worker users as ACL SETUSER "
        "commands (pipe them to redis-cli) or aclfile lines. With a password file, the "
        "line holds the password's SHA-256, not the password; without, a placeholder "
        "that Redis refuses until it is replaced.",
    )
    cmd.add_argument("--format", choices=("setuser", "aclfile"), default="setuser")
    cmd.add_argument("--gateway-password-file", type=Path, metavar="FILE")
    cmd.add_argument("--worker-password-file", type=Path, metavar="FILE")
    cmd.set_defaults(func=_print_users)


def _print_users(args: argparse.Namespace) -> int:
    for user, path in ((GATEWAY, args.gateway_password_file), (WORKER, args.worker_password_file)):
        print(_line(user, _password_rule(path), args.format))
    return 0


def _password_rule(path: Path | None) -> str:
    if path is None:
        return PLACEHOLDER
    # The same trimming as TASKMUX_REDIS_PASSWORD_FILE (taskmux.config.env_secret).
    password = path.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    if not password:
        raise SystemExit(f"{path} is empty")
    return password_hash(password)


def _line(user: AclUser, password_rule: str, fmt: str) -> str:
    if fmt == "aclfile":
        return aclfile_line(user, password_rule)
    return shlex.join(["ACL", *setuser_args(user, password_rule)])
