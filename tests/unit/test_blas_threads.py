"""The worker process runs numpy's OpenBLAS on one thread unless the operator says otherwise
(`workers/__main__.py`): OpenBLAS reads the setting once, when numpy loads, so it must be
in the environment before any import of numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import sys, workers.__main__, os; "
    "print(os.environ['OPENBLAS_NUM_THREADS'], 'numpy' in sys.modules)"
)


def _probe(env: dict[str, str]) -> list[str]:
    out = subprocess.run(  # nosec B603: fixed argv
        [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    return out.stdout.split()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    return env | extra


def test_the_worker_sets_one_blas_thread_before_numpy_loads() -> None:
    assert _probe(_env()) == ["1", "True"]  # set, and numpy loaded after it


def test_an_operators_blas_threads_win() -> None:
    assert _probe(_env(OPENBLAS_NUM_THREADS="3")) == ["3", "True"]


def test_numpy_is_not_loaded_before_the_worker_sets_it() -> None:
    source = (ROOT / "workers" / "__main__.py").read_text(encoding="utf-8")
    setting = source.index('os.environ.setdefault("OPENBLAS_NUM_THREADS"')
    first_import = min(
        source.index(line) for line in source.splitlines() if line.startswith("from ")
        and not line.startswith("from __future__")
    )  # fmt: skip
    assert setting < first_import
