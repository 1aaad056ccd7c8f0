"""Stopping owned tasks: a cancellation lost inside a library must not hang a shutdown."""

from __future__ import annotations

import asyncio
import logging

import pytest

from taskmux.lifecycle import cancel_and_wait


async def test_a_task_that_loses_one_cancellation_is_cancelled_again() -> None:
    lost = 0

    async def loop_that_swallows_once() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1  # as a cancellation lost inside a redis-py command would be

    task = asyncio.create_task(loop_that_swallows_once())
    await asyncio.sleep(0.01)
    await cancel_and_wait(task)
    assert task.cancelled() and lost == 1


async def test_a_task_that_never_ends_is_left_after_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue  # every cancellation lost

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0.01)  # running: a task cancelled before its first step just ends
    with caplog.at_level(logging.ERROR):
        await cancel_and_wait(task, wait_s=0.5)
    assert not task.done()
    assert "stubborn did not end" in caplog.text
    stop.set()
    await task


async def test_a_task_failure_is_raised() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="boom"):
        await cancel_and_wait(task)
