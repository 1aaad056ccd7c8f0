"""protos/ evolves compatibly: buf lint passes, and buf breaking (make proto-lint) catches
a breaking change against the recorded API while letting a compatible one through."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import missing

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "tools" / "buf" / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / "protos" / "taskmux.v1.binpb"
PROTO = Path("protos") / "taskmux" / "v1" / "taskmux.proto"


@pytest.fixture(scope="module")
def buf() -> Path:
    if shutil.which("node") is None:
        missing("node: apt-get install nodejs npm (.ci/run does), then make proto-lint")
    if not BUF.exists():
        missing("tools/buf/node_modules: run `make proto-lint` (npm ci there)")
    return BUF


def _run(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _edited_copy(tmp_path: Path, edit: Callable[[str], str]) -> Path:
    """A copy of buf.yaml and protos/ under tmp_path, with `edit` applied to the proto."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / PROTO
    before = proto.read_text(encoding="utf-8")
    after = edit(before)
    assert after != before, "the edit changed nothing: its pattern no longer matches the proto"
    proto.write_text(after, encoding="utf-8")
    return tmp_path


def _in_message(message: str, old: str, new: str) -> Callable[[str], str]:
    """An edit that replaces `old` by `new` inside `message MESSAGE { ... }` only."""

    def edit(text: str) -> str:
        block = re.search(rf"^message {message} \{{.*?^\}}", text, re.S | re.M)
        assert block is not None, message
        body = block.group(0).replace(old, new, 1)
        return text[: block.start()] + body + text[block.end() :]

    return edit


def test_the_proto_passes_lint(buf: Path) -> None:
    result = _run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_recorded_baseline_is_the_current_api(buf: Path) -> None:
    result = subprocess.run(
        [str(buf), "build", "--exclude-source-info", "-o", "-"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert result.stdout == BASELINE.read_bytes(), "protos/ changed: run make proto-baseline"


def test_make_lint_runs_buf_lint_and_breaking() -> None:
    if shutil.which("make") is None:
        missing("make")
    plan = subprocess.run(
        ["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "buf lint" in plan
    assert "buf breaking --against protos/taskmux.v1.binpb" in plan


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            _in_message("ClassifyRequest", "  int32 top_k = 3;\n", ""),
            'field "3" with name "top_k" on message "ClassifyRequest" was deleted',
        ),
        (
            _in_message("EmbedResponse", "string model = 2;", "string model = 9;"),
            'field "2" with name "model" on message "EmbedResponse" was deleted',
        ),
        (
            _in_message("LabelScore", "float score = 2;", "double score = 2;"),
            'Field "2" with name "score" on message "LabelScore" changed type',
        ),
    ],
    ids=["delete-field", "renumber-field", "retype-field"],
)
def test_a_breaking_change_fails_naming_it(
    buf: Path, tmp_path: Path, edit: Callable[[str], str], expected: str
) -> None:
    copy = _edited_copy(tmp_path, edit)
    result = _run(buf, "breaking", "--against", str(BASELINE), cwd=copy)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout + result.stderr


def test_a_compatible_change_passes(buf: Path, tmp_path: Path) -> None:
    added = _in_message(
        "ClassifyResponse",
        "string head_version = 5;",
        "string head_version = 5;\n  // A field added within v1.\n  string note = 6;",
    )
    copy = _edited_copy(tmp_path, added)
    result = _run(buf, "breaking", "--against", str(BASELINE), cwd=copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _run(buf, "lint", cwd=copy).returncode == 0
