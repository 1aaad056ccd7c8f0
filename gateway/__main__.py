"""Run a gateway: `python -m gateway` (or `taskmux gateway`), configured by TASKMUX_* env vars."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from gateway.server import serve
from gateway.settings import settings_from_environ
from taskmux.lifecycle import install_stop_signals
from taskmux.logs import configure_from_env

log = logging.getLogger("gateway")

# Read by taskmux.logs.configure_from_env; named here for the manifest checks.
LOG_SETTINGS = ("TASKMUX_LOG_LEVEL", "TASKMUX_LOG_FORMAT", "TASKMUX_LOG_TEXTS")


def main() -> int:
    """Process entry point: serve until SIGTERM/SIGINT; a second signal exits at once."""
    configure_from_env(os.environ, default_format="json")  # reads LOG_SETTINGS
    settings = settings_from_environ()
    log.info("starting %s", settings.describe())

    async def run() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop, log)
        await serve(settings, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
