"""tools/unasync.py: the committed sync.py is what aio.py generates, and a stale or
untranslatable client is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import unasync


def test_the_committed_sync_client_is_up_to_date() -> None:
    assert unasync.main(["--check"]) == 0
    assert unasync.TARGET.read_text(encoding="utf-8").startswith(unasync.HEADER)


def test_a_stale_sync_client_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "client/taskmux_client/sync.py"
    stale.parent.mkdir(parents=True)
    stale.write_text(unasync.TARGET.read_text(encoding="utf-8").replace("def embed", "def emb"))
    monkeypatch.setattr(unasync, "ROOT", tmp_path)
    monkeypatch.setattr(unasync, "TARGET", stale)
    assert unasync.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "+    def embed(" in out
    assert "client/taskmux_client/sync.py is stale: run `make client-sync`" in out
    assert unasync.main([]) == 0
    assert unasync.main(["--check"]) == 0


SOURCE = '''\
"""The asyncio thing. (asyncio only: mind the loop.)"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Awaitable

from taskmux_client._streams import async_enumerate, cancel


class AsyncThing:
    async def __aenter__(self) -> AsyncThing:
        return self

    async def each(self, items: Iterable[int] | AsyncIterable[int]) -> AsyncIterator[int]:
        async for index, item in async_enumerate(items):
            await asyncio.sleep(random.random())
            yield index + item

    async def relay(self, call: AsyncIterator[int]) -> AsyncIterator[int]:
        try:
            async for item in call:
                yield item
        finally:
            cancel(call)

    async def one(self, fn: Callable[[], Awaitable[int]]) -> int:
        return await fn()
'''

EXPECTED = '''\
"""The blocking thing."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator

from taskmux_client._streams import cancel


class Thing:
    def __enter__(self) -> Thing:
        return self

    def each(self, items: Iterable[int]) -> Iterator[int]:
        for index, item in enumerate(items):
            time.sleep(random.random())
            yield index + item

    def relay(self, call: Iterator[int]) -> Iterator[int]:
        try:
            yield from call
        finally:
            cancel(call)

    def one(self, fn: Callable[[], int]) -> int:
        return fn()
'''


def test_the_rewrite_rules() -> None:
    assert unasync.unasync(SOURCE) == unasync.HEADER + EXPECTED


def test_a_construct_no_rule_covers_is_refused() -> None:
    source = "async def f(lock: object) -> None:\n    async with lock:\n        aio_thing()\n"
    with pytest.raises(ValueError, match=r"line 3: aio_thing\(\)"):
        unasync.unasync(source)
