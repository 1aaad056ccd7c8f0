"""`taskmux redis-acl`: print taskmux's Redis ACL users (router/acl.py)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from router.acl import (
    ADMIN,
    GATEWAY,
    HA_USERS,
    KEDA,
    REPLICA,
    SENTINEL,
    USERS,
    WORKER,
    AclUser,
    aclfile_line,
    default_user_aclfile_line,
    default_user_setuser_args,
    password_hash,
    setuser_args,
)

# Not a valid rule, so that a line whose placeholder was not replaced is refused.
PLACEHOLDER = "#<sha256-of-password>"
# The option naming each user's password file.
PASSWORD_OPTIONS = {
    GATEWAY.name: "--gateway-password-file",
    WORKER.name: "--worker-password-file",
    KEDA.name: "--keda-password-file",
    ADMIN.name: "--admin-password-file",
    REPLICA.name: "--replica-password-file",
    SENTINEL.name: "--sentinel-password-file",
}


def add_redis_acl_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `taskmux redis-acl`."""
    cmd = sub.add_parser(
        "redis-acl",
        help="Print the least-privilege Redis ACL users (gateway, worker, KEDA, admin)",
        description="Print the taskmux-gateway, taskmux-worker, taskmux-keda and "
        "taskmux-admin users, then the default user switched off, as ACL SETUSER commands "
        "(pipe them to redis-cli) or as a whole aclfile. With a password file, a user's "
        "line holds the password's SHA-256, not the password; without, a placeholder that "
        "Redis refuses until it is replaced.",
    )
    cmd.add_argument("--format", choices=("setuser", "aclfile"), default="setuser")
    cmd.add_argument(
        "--ha",
        action="store_true",
        help="also print taskmux-replica and taskmux-sentinel, the users a replicated "
        "Valkey with Sentinel needs (k8s/overlays/ha)",
    )
    for user in (*USERS, *HA_USERS):
        cmd.add_argument(PASSWORD_OPTIONS[user.name], type=Path, metavar="FILE", dest=user.name)
    cmd.set_defaults(func=_print_users)


def _print_users(args: argparse.Namespace) -> int:
    for user in (*USERS, *HA_USERS) if args.ha else USERS:
        print(_line(user, _password_rule(vars(args)[user.name]), args.format))
    # Last, so that SETUSER lines piped to a redis-cli logged in as default all run.
    if args.format == "aclfile":
        print(default_user_aclfile_line())
    else:
        print(shlex.join(["ACL", *default_user_setuser_args()]))
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
