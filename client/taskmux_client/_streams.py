"""What the two clients' streaming calls need beyond retries: ending a call, numbering tasks.

`aio.py` uses these; `tools/unasync.py` maps them to their blocking forms in `sync.py`
(`async_enumerate` becomes the builtin `enumerate`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Protocol, TypeVar

T = TypeVar("T")


class _Cancellable(Protocol):
    def cancel(self) -> object: ...


def cancel(call: _Cancellable) -> None:
    """Cancel a call, a no-op once it has ended: a stream the caller leaves frees the server.

    One typed place for both kinds of call (grpc-stubs leaves the blocking one's untyped).
    """
    call.cancel()


async def async_enumerate(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[tuple[int, T]]:
    """`enumerate` over a plain or an async iterable."""
    if isinstance(items, AsyncIterable):
        index = 0
        async for item in items:
            yield index, item
            index += 1
    else:
        for pair in enumerate(items):
            yield pair
