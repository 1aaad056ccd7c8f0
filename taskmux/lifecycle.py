"""Small pieces every process's lifecycle shares: stopping owned tasks, stop signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task this component owns and wait until it has really ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def install_stop_signals(stop: asyncio.Event, log: logging.Logger) -> None:
    """First SIGTERM/SIGINT sets `stop` (drain); a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("signal received: finishing in-flight work")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
