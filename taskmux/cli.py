"""The `taskmux` command: run each part, build the model, and call the service."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from taskmux.aclcli import add_redis_acl_command
from taskmux.clientargs import add_connection_arguments
from taskmux.clitasks import add_task_commands
from taskmux.keyscli import add_keys_command
from taskmux.loadtest.cli import add_loadtest_command
from taskmux.modelcli import add_model_commands

if TYPE_CHECKING:
    from google.protobuf.message import Message
    from taskmux_client import TaskMuxClient


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `taskmux` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("TASKMUX_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskmux", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def add(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    add("gateway", _gateway, "Run a gateway (settings from TASKMUX_* env vars)")
    add("worker", _worker, "Run a worker (settings from TASKMUX_* env vars)")
    up = add("up", _up, "Start Valkey, gateways and workers, each a process; Ctrl-C stops all")
    up.add_argument("--model-repo", default="model-repo")
    up.add_argument("--port", type=int, default=50051, help="gateway port (shared by all)")
    up.add_argument("--gateways", type=int, default=1, metavar="N", help="gateway processes")
    up.add_argument("--workers", type=int, default=1, metavar="M", help="worker processes")
    up.add_argument(
        "--seal",
        action="store_true",
        help="encrypt payloads in Valkey under a key made for this run (README: Security)",
    )

    add_model_commands(sub)
    add_loadtest_command(sub)
    add_keys_command(sub)
    add_redis_acl_command(sub)

    add_task_commands(sub)
    tasks = add("tasks", _tasks, "List heads, encoder and limits; prints JSON")
    add_connection_arguments(tasks)
    return parser


def _gateway(_args: argparse.Namespace) -> int:
    # This process has imported grpc already, too late for the gRPC settings that
    # `python -m gateway` chooses before its first import (gateway/__main__.py): become it.
    os.execv(sys.executable, [sys.executable, "-m", "gateway"])  # nosec B606


def _worker(_args: argparse.Namespace) -> int:
    from workers.__main__ import main as worker_main

    return worker_main()


def _up(args: argparse.Namespace) -> int:
    from taskmux.local import run_local

    return run_local(
        Path(args.model_repo),
        gateway_port=args.port,
        gateways=args.gateways,
        workers=args.workers,
        seal=args.seal,
    )


def _call(args: argparse.Namespace, call: Callable[[TaskMuxClient], Message]) -> int:
    """Run one call with the command's target, deadline, key and TLS; print it as JSON.

    A failure is one line on stderr (exit 1; 2 for unusable options), never a traceback.
    """
    from google.protobuf.json_format import MessageToDict
    from taskmux_client import TaskMuxClient, TaskMuxError

    from taskmux.clientargs import ClientOptionsError, security_from_args

    try:
        security = security_from_args(args)
    except ClientOptionsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    client = TaskMuxClient(
        args.target, timeout_s=args.timeout, api_key=security.api_key, tls=security.tls or False
    )
    with client:
        try:
            response = call(client)
        except TaskMuxError as err:
            print(f"error: {err}", file=sys.stderr)  # e.g. "UNAUTHENTICATED: invalid API key"
            return 1
    print(json.dumps(MessageToDict(response), indent=2, ensure_ascii=False))
    return 0


def _tasks(args: argparse.Namespace) -> int:
    return _call(args, lambda client: client.list_tasks())


if __name__ == "__main__":
    sys.exit(main())
