"""Run a gateway: `python -m gateway` (or `taskmux gateway`), configured by TASKMUX_* env vars."""

from __future__ import annotations

import os

# gRPC reads GRPC_EXPERIMENTS once, when it is first imported, so this precedes every
# import of grpc. Its EventEngine listener and client hand each I/O event to a thread pool
# whose threads sleep between calls: after the idle gap of a lone caller (one call at a
# time), the wake-ups cost about 0.7 ms per unary call on the bench machine. The older
# iomgr paths poll on the thread that waits. An operator's own GRPC_EXPERIMENTS wins.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)

import asyncio  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from gateway.server import serve  # noqa: E402
from gateway.settings import settings_from_environ  # noqa: E402
from taskmux.config import SettingsError  # noqa: E402
from taskmux.lifecycle import install_stop_signals, run_process  # noqa: E402
from taskmux.logs import configure_from_env  # noqa: E402

log = logging.getLogger("gateway")


def main() -> int:
    """Process entry point: serve until SIGTERM/SIGINT; a second signal exits at once."""
    configure_from_env(os.environ, default_format="json")
    try:
        settings = settings_from_environ()
    except SettingsError as err:
        log.error("cannot start: %s", err)
        return 2
    log.info("starting %s", settings.describe())

    async def run() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop, log)
        await serve(settings, stop)

    run_process(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
