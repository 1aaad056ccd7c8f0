"""Generate the blocking client, `taskmux_client/sync.py`, from the asyncio one, `aio.py`.

    python -m tools.unasync           # write sync.py (make client-sync)
    python -m tools.unasync --check   # exit 1 if sync.py is not what aio.py generates (make lint)

The idea of httpcore's unasync.py: the client is written once, with async/await, and the
blocking twin is a mechanical rewrite of it, token by token (`RULES`), so the two cannot
drift apart. What cannot be rewritten that way lives in modules both import (`retry.py`,
`_streams.py`). Text in a docstring inside "(asyncio only: ...)" is left out of sync.py.
After the rewrite, each `from ... import` drops the names that became builtins or that
nothing uses any more, the plain `import` lines are re-sorted, and a token of asyncio
left over fails the run: aio.py has to be written so that the rewrite covers it.
"""

from __future__ import annotations

import argparse
import builtins
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "client/taskmux_client/aio.py"
TARGET = ROOT / "client/taskmux_client/sync.py"
HEADER = (
    "# Generated from aio.py by tools/unasync.py (make client-sync): edit aio.py, not this file.\n"
)

# (pattern, replacement), applied in order to the whole text of aio.py.
RULES: list[tuple[str, str]] = [
    (r" ?\(asyncio only: [^)]*\)", ""),
    (r"^import asyncio$", "import time"),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"\basyncio\b", "blocking"),  # in prose: "the asyncio client"
    (r"\basync (def|for|with)\b", r"\1"),
    (r"\bawait ", ""),
    (r"\bgrpc\.aio\.", "grpc."),
    (r"\bAwaitable\[(\w+)\]", r"\1"),
    (r"\bAsync(?=[A-Z])", ""),  # AsyncTaskMuxClient, AsyncIterator, AsyncIterable
    (r"\b__a(enter|exit)__\b", r"__\1__"),
    (r"\bopen_aio_channel\b", "open_channel"),
    (r"\basync_enumerate\b", "enumerate"),
    # grpc.aio's Channel.close takes a grace period; the blocking one takes nothing.
    (r"\.close\(None\)", ".close()"),
    # `Iterable[Task] | AsyncIterable[Task]` has become the same type twice.
    (r"\b(\w+\[[\w.]+\]) \| \1(?![\w\[])", r"\1"),
    # What was `async for x in call: yield x` (ruff's UP028 asks for this form).
    (r"^( +)for (\w+) in ([\w.]+):\n +yield \2$", r"\1yield from \3"),
]
# Inside names too (`open_aio_channel`): a name without a rule would call the async API.
LEFTOVER = re.compile(r"(?<![A-Za-z])(async|await|asyncio|aio|Awaitable)(?![a-z])|\bAsync[A-Z]")
FROM_IMPORT = re.compile(r"^from ([\w.]+) import (\(\n(?:    [^\n]*\n)+\)|[^\n(]+)\n", re.M)
PLAIN_IMPORTS = re.compile(r"^(?:import [\w.]+\n)+", re.M)


def unasync(source: str) -> str:
    """The blocking module for the asyncio module `source`."""
    text = source
    for pattern, replacement in RULES:
        text = re.sub(pattern, replacement, text, flags=re.M)
    text = _tidy_imports(text)
    leftover = [
        f"line {n}: {line.strip()}"
        for n, line in enumerate(text.splitlines(), 1)
        if LEFTOVER.search(line)
    ]
    if leftover:
        raise ValueError("no rule rewrites these lines:\n" + "\n".join(leftover))
    return HEADER + text


def _tidy_imports(text: str) -> str:
    text = PLAIN_IMPORTS.sub(lambda m: "".join(sorted(m.group(0).splitlines(keepends=True))), text)
    body = FROM_IMPORT.sub("", text)
    return FROM_IMPORT.sub(lambda m: _from_import(m.group(1), m.group(2), body), text)


def _from_import(module: str, names_text: str, body: str) -> str:
    """One `from module import ...` with only the names still used, in ruff's order."""
    names = [n.strip() for n in names_text.strip("()\n").split(",") if n.strip()]
    kept = sorted({n for n in names if _still_used(module, n, body)}, key=_member_order)
    if not kept:
        return ""
    if names_text.startswith("("):
        return f"from {module} import (\n" + "".join(f"    {n},\n" for n in kept) + ")\n"
    return f"from {module} import {', '.join(kept)}\n"


def _still_used(module: str, name: str, body: str) -> bool:
    if module == "__future__":
        return True
    bound = name.split(" as ")[-1]
    return not hasattr(builtins, bound) and re.search(rf"\b{bound}\b", body) is not None


def _member_order(name: str) -> tuple[int, str]:
    """isort's order of imported names: CONSTANTS, then Classes, then functions."""
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[0].isupper() else 2
    return kind, name.lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if sync.py differs from what aio.py generates"
    )
    args = parser.parse_args(argv)
    try:
        generated = unasync(SOURCE.read_text(encoding="utf-8"))
    except ValueError as err:
        print(f"{SOURCE.relative_to(ROOT)}: {err}")
        return 1
    if not args.check:
        TARGET.write_text(generated, encoding="utf-8")
        return 0
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    if current == generated:
        return 0
    diff = difflib.unified_diff(
        current.splitlines(keepends=True),
        generated.splitlines(keepends=True),
        str(TARGET.relative_to(ROOT)),
        "generated from aio.py",
    )
    sys.stdout.writelines(diff)
    print(f"{TARGET.relative_to(ROOT)} is stale: run `make client-sync` and commit it")
    return 1


if __name__ == "__main__":
    sys.exit(main())
