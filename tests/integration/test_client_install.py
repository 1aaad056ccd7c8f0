"""The client installs alone: `pip install ./client` into a fresh venv (no system site
packages, nothing else installed) pulls in neither ONNX Runtime, Redis nor numpy nor the
server's packages, and that venv's python embeds and classifies through a running gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Cluster, missing, serving, wait_for_catalog, wait_until

ROOT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 240
# What the server needs and the client must not: the model runtime, the queue, the maths,
# and the server's own packages.
NOT_INSTALLED = ("onnxruntime", "redis", "numpy", "tokenizers", "taskmux", "gateway", "workers")

CALL_GATEWAY = """
import json, sys
import taskmux_api, taskmux_client
from taskmux_client import TaskMuxClient

with TaskMuxClient(sys.argv[1], timeout_s=30) as client:
    vector = client.embed(["hello world"]).embeddings[0].values
    label = client.classify("sentiment", ["I loved this film"]).results[0].label
print(json.dumps({
    "dimension": len(vector),
    "label": label,
    "files": [taskmux_client.__file__, taskmux_api.__file__],
}))
"""


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH and the like, which would reach the checkout."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def _run(argv: list[str], cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout_s
    )


def _venv(python: str, path: Path) -> Path:
    """A fresh, empty venv at `path` (no system site packages); its python.

    Without pip: the test's own pip installs into it (`pip --python`), which saves the
    seconds of ensurepip and leaves in the venv only what the client brought.
    """
    result = _run([python, "-m", "venv", "--without-pip", str(path)], path.parent)
    if result.returncode != 0:
        pytest.fail(f"{python} -m venv {path} failed:\n{result.stderr[-2000:]}")
    return path / "bin" / "python"


def _size(path: Path) -> int:
    """Bytes in the files under `path` (or of the file `path`)."""
    assert path.exists(), path
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, model_repo: Path) -> str:
    _, address = cluster.start_gateway()
    wait_until(lambda: serving(address), 30, "gateway SERVING")
    wait_for_catalog(address, model_repo)
    return address


@pytest.mark.integration
def test_the_client_installs_alone_and_calls_a_gateway(
    gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = shutil.which("python3.11")
    if base is None:
        missing("python3.11 with its venv module: apt-get install python3.11 python3.11-venv")
    # A copy, so that the build leaves no build/ or egg-info in the checkout (where a
    # stale build/lib could also slip into a later wheel).
    source = tmp_path / "client-src"
    shutil.copytree(
        ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv = tmp_path / "client-venv"
    python = _venv(base, venv)
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-input"]
    install = _run([*pip, str(source)], tmp_path, PIP_TIMEOUT_S)
    if install.returncode != 0:
        pytest.fail(
            "pip install ./client into a fresh venv failed (grpcio, protobuf and grpcio-status "
            "must come from the configured indexes or /opt/wheels):\n" + install.stderr[-3000:]
        )

    for module in NOT_INSTALLED:
        probe = _run([str(python), "-c", f"import {module}"], tmp_path)
        assert probe.returncode != 0, f"`import {module}` works in the client-only venv"
        assert "ModuleNotFoundError" in probe.stderr, probe.stderr

    called = _run([str(python), "-c", CALL_GATEWAY, gateway], tmp_path)
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    assert answer["dimension"] == 384
    assert answer["label"] == "positive"
    assert all(Path(f).is_relative_to(venv) for f in answer["files"]), answer["files"]

    site = _site_packages(venv)
    package_bytes = sum(_size(site / name) for name in ("taskmux_client", "taskmux_api"))
    bare = tmp_path / "bare-venv"
    _venv(base, bare)
    added_bytes = _size(venv) - _size(bare)
    assert 0 < package_bytes < added_bytes
    with capsys.disabled():
        print(
            f"\ntaskmux-client installed: taskmux_client + taskmux_api {package_bytes / 1e3:.0f} kB;"
            f" the venv {added_bytes / 1e6:.1f} MB more than a bare venv (grpcio, protobuf,"
            " grpcio-status and what they need)"
        )
