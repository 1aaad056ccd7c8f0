"""Running a task command: texts in, batches out with several in flight, results in order.

The input is read a batch at a time and at most `--concurrency` requests are in flight,
so a file of any size runs in bounded memory; results are printed in input order as soon
as every earlier batch has been printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from taskmux.clientargs import ClientOptionsError, ClientSecurity, security_from_args
from taskmux.cliinput import (
    Batch,
    InputError,
    batches,
    count_texts,
    open_input,
    parse_lines,
    read_lines,
)
from taskmux.clioutput import (
    BatchResult,
    Column,
    JsonlOutput,
    JsonOutput,
    Output,
    ProgressBar,
    TableOutput,
)

if TYPE_CHECKING:
    from taskmux_client import AsyncTaskMuxClient

Call = Callable[["AsyncTaskMuxClient", argparse.Namespace, Batch], Awaitable[BatchResult]]


@dataclass(frozen=True)
class TaskCommand:
    """One RPC as a command: its own options, the call per batch, and how it prints."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    call: Call
    merge: Callable[[list[BatchResult], argparse.Namespace], Any]  # --format json
    columns: Callable[[argparse.Namespace], list[Column]]  # --format table, before the text


class BatchFailed(Exception):
    """A request failed; carries the batch, so the message can say which texts."""

    def __init__(self, batch: Batch, error: Exception) -> None:
        super().__init__(str(error))
        self.batch = batch
        self.error = error


def run_task_command(command: TaskCommand, args: argparse.Namespace) -> int:
    """Run `command` as the parsed `args` ask; the exit status.

    0 every text done; 1 the gateway refused or failed a call; 2 unusable options or input.
    Each failure is one line on stderr, never a traceback.
    """
    try:
        security = security_from_args(args)
        _check_sources(args)
    except (ClientOptionsError, InputError) as err:
        return _fail(str(err), 2)
    try:
        with open_input(args.input) as stream:
            texts = _texts(args, stream)
            return asyncio.run(_run(command, args, security, texts))
    except InputError as err:
        return _fail(str(err), 2)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit-time
        # flush of stdout from raising the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def _check_sources(args: argparse.Namespace) -> None:
    if args.texts and args.input is not None:
        raise InputError("give texts as arguments or --input, not both")
    if not args.texts and args.input is None:
        raise InputError("no texts: give them as arguments, or --input FILE (- for stdin)")


def _texts(args: argparse.Namespace, stream: TextIO | None) -> Iterator[str]:
    if stream is None:
        return iter(args.texts)
    return parse_lines(read_lines(stream, args.input), args.input_format)


def output_for(command: TaskCommand, args: argparse.Namespace, stream: TextIO) -> Output:
    """The printer --format names; by default JSON for texts given as arguments (one
    document, as the RPC answers) and JSONL for --input (a line per text as it is done)."""
    output_format = args.format or ("json" if args.input is None else "jsonl")
    if output_format == "json":
        return JsonOutput(stream, lambda results: command.merge(results, args))
    if output_format == "table":
        return TableOutput(stream, command.columns(args))
    return JsonlOutput(stream)


async def _run(
    command: TaskCommand, args: argparse.Namespace, security: ClientSecurity, texts: Iterator[str]
) -> int:
    from taskmux_client import AsyncTaskMuxClient, TaskMuxError

    output = output_for(command, args, sys.stdout)
    progress = _progress(args)
    client = AsyncTaskMuxClient(
        args.target, timeout_s=args.timeout, api_key=security.api_key, tls=security.tls or False
    )
    async with client:

        async def call(batch: Batch) -> BatchResult:
            try:
                return await command.call(client, args, batch)
            except TaskMuxError as err:
                raise BatchFailed(batch, err) from None

        def emit(result: BatchResult) -> None:
            output.batch(result)
            progress.advance(len(result.records))

        try:
            await run_in_order(batches(texts, args.batch_size), call, args.concurrency, emit)
        except BatchFailed as failed:
            progress.close()
            return _fail(_batch_error(failed), 1)
        finally:
            progress.close()
    output.finish()
    return 0


def _progress(args: argparse.Namespace) -> ProgressBar:
    """A bar on stderr if it is a terminal; its total counted first where that is cheap."""
    if not sys.stderr.isatty():
        return ProgressBar(sys.stderr, None, enabled=False)
    total = len(args.texts) if args.input is None else count_texts(args.input, args.input_format)
    return ProgressBar(sys.stderr, total, enabled=True)


async def run_in_order(
    source: Iterator[Batch],
    call: Callable[[Batch], Coroutine[Any, Any, BatchResult]],
    concurrency: int,
    emit: Callable[[BatchResult], None],
) -> None:
    """Call each batch of `source` with up to `concurrency` in flight; emit results in order.

    The next batch is read (off the event loop: it may wait on stdin) only once there is
    room in the window. On a failure the calls still in flight are cancelled.
    """
    window: deque[asyncio.Task[BatchResult]] = deque()
    try:
        while (batch := await asyncio.to_thread(next, source, None)) is not None:
            window.append(asyncio.create_task(call(batch)))
            if len(window) >= concurrency:
                emit(await window.popleft())
        while window:
            emit(await window.popleft())
    finally:
        for task in window:
            task.cancel()
        await asyncio.gather(*window, return_exceptions=True)


def _batch_error(failed: BatchFailed) -> str:
    """E.g. "INVALID_ARGUMENT: texts[3] is empty (texts 32-63)": the span only where the
    texts are at fault; a refused key or an unknown head concern every batch alike."""
    import grpc

    message = str(failed.error)
    if getattr(failed.error, "status", None) == grpc.StatusCode.INVALID_ARGUMENT:
        message += f" (in input {failed.batch.span})"
    return message


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
