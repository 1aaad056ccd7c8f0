"""`run_load`: drive a deployment with a closed or an open loop and report what it saw."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from contextlib import AsyncExitStack

from taskmux_client.channel import auth_metadata, open_aio_channel

from taskmux.loadtest.calls import (
    CHANNEL_OPTIONS,
    Method,
    PreparedTask,
    bind,
    keyed,
    outcome,
    prepare_tasks,
)
from taskmux.loadtest.config import LoadConfig
from taskmux.loadtest.report import LoadReport, build_report
from taskmux.loadtest.samples import LiveStatus, Recorder
from taskmux.loadtest.schedule import Picker, poisson_arrivals

_STOP_POLL_S = 0.25  # longest an open-loop scheduler sleeps before looking at `stop` again


async def run_load(
    config: LoadConfig,
    *,
    on_tick: Callable[[LiveStatus], None] | None = None,
    tick_s: float = 0.5,
    stop: asyncio.Event | None = None,
) -> LoadReport:
    """Run the load described by `config` and return its report.

    `on_tick` is called every `tick_s` with the counters so far (a progress display);
    setting `stop` ends the run early: nothing new is sent, calls in flight finish.
    Never raises for failed calls: they are counted by status code in the report.
    """
    tasks = prepare_tasks(config)
    stop = stop or asyncio.Event()
    async with AsyncExitStack() as stack:
        methods: list[tuple[Method, ...]] = []
        credentials = config.tls.credentials() if config.tls else None
        metadata = auth_metadata(config.api_key)
        for _ in range(config.connections):
            channel = open_aio_channel(config.target, credentials, CHANNEL_OPTIONS)
            stack.push_async_callback(channel.close, None)
            methods.append(bind(channel, tasks, metadata))
        run = _Run(config, tasks, methods, stop)
        done = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            if on_tick is not None:
                group.create_task(_ticker(run, on_tick, tick_s, done))
            try:
                await (run.closed_loop() if config.mode == "closed" else run.open_loop())
            finally:
                done.set()
        elapsed = time.perf_counter() - run.t0
    return build_report(
        config,
        tuple(t.texts for t in tasks),
        run.recorder.samples(),
        last_send_s=run.last_send - run.t0,
        elapsed_s=elapsed,
        max_send_lag_s=run.max_lag,
        interrupted=stop.is_set(),
    )


class _Run:
    """The state of one run: clock, budget, picks and the recorder."""

    def __init__(
        self,
        config: LoadConfig,
        tasks: tuple[PreparedTask, ...],
        methods: list[tuple[Method, ...]],
        stop: asyncio.Event,
    ) -> None:
        self.config = config
        self.tasks = tasks
        self.methods = methods
        self.stop = stop
        self.picker = Picker(
            [e.weight for e in config.mix], [len(t.requests) for t in tasks], config.seed + 2
        )
        self.t0 = time.perf_counter()
        self.last_send = self.t0
        self.max_lag = 0.0
        self.measure_start = self.t0 + config.warmup_s
        self.end = None if config.duration_s is None else self.measure_start + config.duration_s
        self.recorder = Recorder(self.t0, config.warmup_s)

    def may_send(self, at: float) -> bool:
        """Whether a call due at clock time `at` is still within the run's bounds."""
        if self.stop.is_set() or (self.end is not None and at >= self.end):
            return False
        budget = self.config.requests
        return (
            budget is None
            or not self.recorder.is_measured(at)
            or (self.recorder.measured_sent < budget)
        )

    def begin(self, start: float) -> None:
        """Count a call as sent at clock time `start`, before it is handed to the loop."""
        self.recorder.started(start)
        self.last_send = max(self.last_send, start)

    async def call(self, channel: int, task: int, request: int, start: float) -> None:
        """Send one call already counted by `begin`, and record how it ended."""
        prepared = self.tasks[task]
        message = prepared.requests[request]
        if self.config.idempotency_keys:
            message = keyed(message)
        code, details = await outcome(
            self.methods[channel][task],
            message,
            prepared.streaming,
            self.config.deadline_s,
        )
        self.recorder.finished(task, start, time.perf_counter(), code, details)

    async def closed_loop(self) -> None:
        """`concurrency` callers, caller i on channel i mod connections, back to back."""
        async with asyncio.TaskGroup() as group:
            for i in range(self.config.concurrency):
                group.create_task(self._caller(i % self.config.connections))

    async def _caller(self, channel: int) -> None:
        while True:
            now = time.perf_counter()
            if not self.may_send(now):
                return
            task, request = self.picker.pick()
            self.begin(now)
            await self.call(channel, task, request, now)

    async def open_loop(self) -> None:
        """Poisson arrivals at `rate`; each call starts when due, whatever is in flight."""
        arrivals = poisson_arrivals(self.config.rate, random.Random(self.config.seed + 3), self.t0)
        async with asyncio.TaskGroup() as group:
            for n, due in enumerate(arrivals):
                if not await self._wait_until(due) or not self.may_send(due):
                    return
                task, request = self.picker.pick()
                if self.recorder.in_flight >= self.config.max_outstanding:
                    self.recorder.drop(task, due)
                    continue
                self.max_lag = max(self.max_lag, time.perf_counter() - due)
                channel = n % self.config.connections
                self.begin(due)
                group.create_task(self.call(channel, task, request, due))

    async def _wait_until(self, due: float) -> bool:
        """Sleep until clock time `due`; False if the run should end first."""
        while True:
            if self.stop.is_set() or (self.end is not None and due >= self.end):
                return False
            delay = due - time.perf_counter()
            if delay <= 0:
                await asyncio.sleep(0)  # behind schedule: still let the calls in flight run
                return True
            await asyncio.sleep(min(delay, _STOP_POLL_S))


async def _ticker(
    run: _Run, on_tick: Callable[[LiveStatus], None], tick_s: float, done: asyncio.Event
) -> None:
    while True:
        try:
            await asyncio.wait_for(done.wait(), tick_s)
        except TimeoutError:
            on_tick(run.recorder.status(time.perf_counter()))
        else:
            on_tick(run.recorder.status(time.perf_counter()))
            return
