"""Keeping local processes running: start each child, restart any that exits (after a
backoff), and stop them all in reverse order on SIGINT or SIGTERM.

`taskmux up` (taskmux/local.py) runs its embedded Valkey, workers and gateways under one
`Supervisor`, so a crashed or killed part comes back as a Kubernetes Deployment would
bring back its pod: the same argv, env, ports and data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from taskmux.backoff import Backoff as ExponentialWaits

STOP_TIMEOUT_S = 15.0


@dataclass
class Backoff:
    """Waits before restarting a child: `initial_s`, doubling up to `max_s`, and back to
    `initial_s` once a run has lasted `reset_after_s` (it was healthy, so the next exit is news)."""

    initial_s: float = 0.5
    max_s: float = 10.0
    reset_after_s: float = 30.0
    _waits: ExponentialWaits = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._waits = ExponentialWaits(self.initial_s, self.max_s)

    def delay_s(self, ran_for_s: float) -> float:
        """The wait before the next start of a child that exited after `ran_for_s`."""
        if ran_for_s >= self.reset_after_s:
            self._waits.reset()
        return self._waits.next_s()


class Child:
    """One supervised process. Its argv and env never change, so a restart brings back the
    same component: the same id, ports and data directory.

    `start` and `stop` are serialised, and nothing starts again once `stop` has run.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.name = name
        self._argv = list(argv)
        self._env = dict(env)
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        self._lock = asyncio.Lock()
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def ran_for_s(self) -> float:
        """Seconds since the last start."""
        return time.monotonic() - self._started_at

    async def start(self) -> None:
        """Start the process (again); a no-op once stopped."""
        async with self._lock:
            if self._stopped:
                return
            # Own session: Ctrl-C reaches only `taskmux up`, which stops the children in order.
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv, env=self._env, start_new_session=True
            )
            self._started_at = time.monotonic()
        print(f"taskmux up: started {self.name} (pid {self._proc.pid})", flush=True)

    async def wait(self) -> int:
        """The exit code of the current process, once it exits (negative: killed by a signal)."""
        assert self._proc is not None, "wait() before start()"
        return await self._proc.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; never starts again."""
        async with self._lock:
            self._stopped = True
            proc = self._proc
            if proc is None or proc.returncode is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class Supervisor:
    """Keeps children running until SIGINT or SIGTERM, then stops them in reverse order.

    A child that exits, whatever its code, is started again after a `Backoff` wait.
    Use as `async with Supervisor() as s: await s.start(child) ...; await s.wait()`.
    """

    def __init__(self, backoff: Callable[[], Backoff] = Backoff) -> None:
        self._backoff = backoff
        self._children: list[Child] = []
        self._stopping = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._group = asyncio.TaskGroup()

    async def __aenter__(self) -> Supervisor:
        # Unwound in reverse: children stop, their watchers end, then the handlers go.
        self._stack.enter_context(self._signal_handlers())
        await self._stack.enter_async_context(self._group)
        self._stack.push_async_callback(self._stop_all)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._stack.__aexit__(*exc_info)

    async def start(self, child: Child) -> None:
        """Start `child` and keep it running from now on."""
        self._children.append(child)
        await child.start()
        self._group.create_task(self._watch(child))

    async def wait(self) -> None:
        """Return on SIGINT or SIGTERM."""
        await self._stopping.wait()

    async def _watch(self, child: Child) -> None:
        backoff = self._backoff()
        while True:
            code = await child.wait()
            if self._stopping.is_set():
                return
            delay_s = backoff.delay_s(child.ran_for_s())
            print(
                f"taskmux up: {child.name} (pid {child.pid}) exited with code {code}; "
                f"restarting in {delay_s:g} s",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay_s)
                return
            await child.start()

    async def _stop_all(self) -> None:
        self._stopping.set()
        for child in reversed(self._children):
            await child.stop()

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
