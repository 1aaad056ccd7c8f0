"""pytest's own configuration: a failure in a thread fails the test, and warnings are errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"

THREAD_FAILS = """
import threading


def test_an_assertion_in_a_thread() -> None:
    def fault() -> None:
        assert False, "raised inside the fault thread"

    thread = threading.Thread(target=fault)
    thread.start()
    thread.join()
"""


def _filters() -> list[str]:
    options = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["pytest"]
    filters: list[str] = options["ini_options"]["filterwarnings"]
    return filters


def test_warnings_are_errors_and_only_named_warnings_are_ignored() -> None:
    filters = _filters()
    assert filters[0] == "error"
    for entry in filters[1:]:
        action, message, *_ = [*entry.split(":"), ""]
        # An ignore must name the message it matches: a bare category (UserWarning,
        # DeprecationWarning) would also swallow PytestUnhandledThreadExceptionWarning.
        assert action == "ignore" and message.strip(), f"too broad: {entry!r}"


def test_an_assertion_failing_in_a_thread_fails_the_test(tmp_path: Path) -> None:
    test = tmp_path / "test_thread.py"
    test.write_text(THREAD_FAILS, encoding="utf-8")
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*pytest, "-c", str(PYPROJECT), "--rootdir", str(tmp_path), str(test)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "PytestUnhandledThreadExceptionWarning" in run.stdout, run.stdout
    assert "1 failed" in run.stdout, run.stdout
