"""Where the code lives: imports across the top-level packages and the largest functions.

`python -m tools.structure` prints two tables for a closing note or a review: how many
modules of each package import each other package, and the longest functions.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("gateway", "workers", "router", "model", "taskmux", "taskmux_api", "taskmux_client")
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def _modules(root: Path, package: str) -> Iterator[Path]:
    base = root / package
    if not base.is_dir():
        base = root / "client" / package  # the client distribution's packages
    if not base.is_dir():
        return
    for path in sorted(base.rglob("*.py")):
        if not path.name.endswith(GENERATED):
            yield path


def _imported_packages(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def import_table(root: Path) -> dict[str, Counter[str]]:
    """For each package, how many of its modules import each other package."""
    table: dict[str, Counter[str]] = {}
    for package in PACKAGES:
        counts: Counter[str] = Counter()
        for path in _modules(root, package):
            tree = ast.parse(path.read_text(), str(path))
            for other in _imported_packages(tree) & set(PACKAGES):
                if other != package:
                    counts[other] += 1
        if any(True for _ in _modules(root, package)):
            table[package] = counts
    return table


def largest_functions(root: Path, count: int) -> list[tuple[int, str]]:
    sizes: list[tuple[int, str]] = []
    for package in (*PACKAGES, "bench", "tools"):
        for path in _modules(root, package):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    where = f"{path.relative_to(root)}:{node.lineno} {node.name}"
                    sizes.append((lines, where))
    return sorted(sizes, reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--largest", type=int, default=10)
    args = parser.parse_args()
    table = import_table(args.root)
    present = list(table)
    print("modules of (row) importing (column)")
    print("| package | " + " | ".join(present) + " |")
    print("|---" * (len(present) + 1) + "|")
    for package in present:
        cells = [("-" if o == package else str(table[package][o])) for o in present]
        print(f"| {package} | " + " | ".join(cells) + " |")
    print("\nlargest functions (lines)")
    for lines, where in largest_functions(args.root, args.largest):
        print(f"{lines:4d}  {where}")


if __name__ == "__main__":
    main()
