"""Generate the Python code for protos/ into the client distribution's `taskmux_api` package.

protoc names Python modules after the proto file's path (`taskmux/v1/...` → `taskmux.v1`),
but the server package owns `taskmux`, so the generated modules live in `taskmux_api.v1`
instead. Only the import lines and the module-name string are rewritten: the proto file
name, package and method paths (`/taskmux.v1.TaskMux/Embed`) stay what clients in other
languages see.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO = "taskmux/v1/taskmux.proto"
PACKAGE_DIR = Path("client/taskmux_api/v1")
GENERATED = ("taskmux_pb2.py", "taskmux_pb2.pyi", "taskmux_pb2_grpc.py", "taskmux_pb2_grpc.pyi")
REWRITES = (
    (re.compile(r"^from taskmux\.v1 import", re.M), "from taskmux_api.v1 import"),
    (re.compile(r"'taskmux\.v1\.taskmux_pb2'"), "'taskmux_api.v1.taskmux_pb2'"),
    (re.compile(r"code in taskmux/v1/"), "code in taskmux_api/v1/"),
)


def generate(out_dir: Path, bin_dir: Path) -> None:
    """Run protoc with the mypy plugins into a scratch folder, then rewrite into out_dir."""
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "protoc",
            "-Iprotos",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--mypy_out={scratch}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_grpc_out={scratch}",
            f"protos/{PROTO}",
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (Path(scratch) / "taskmux/v1" / name).read_text()
            for pattern, replacement in REWRITES:
                text = pattern.sub(replacement, text)
            (out_dir / name).write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR)
    args = parser.parse_args()
    generate(args.out, Path(sys.executable).parent)
    shutil.rmtree(args.out / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
