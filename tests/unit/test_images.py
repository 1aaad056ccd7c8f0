"""tools/images.sh: the parts that need no buildah (which bases it must find or make)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "images.sh"
BUILT = ["gateway", "worker-cpu"]


def _bases(*files: Path) -> list[str]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "bases", *map(str, files)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.split()


def test_bases_leave_out_stage_aliases(tmp_path: Path) -> None:
    dockerfile = tmp_path / "x.Dockerfile"
    dockerfile.write_text(
        "FROM --platform=linux/amd64 a/b:1.2.3 AS one\nRUN true\n"
        "from one AS two\nFROM c:4.5.6\nCOPY --from=one /x /x\n",
        encoding="utf-8",
    )
    assert _bases(dockerfile) == ["a/b:1.2.3", "c:4.5.6"]


@pytest.mark.parametrize("image", BUILT)
def test_built_images_start_from_a_base_the_script_can_make(image: str) -> None:
    """`make images` makes a stand-in only for python:X.Y.Z-slim-bookworm, X.Y.Z >= 3.11.3."""
    for base in _bases(ROOT / "docker" / f"{image}.Dockerfile"):
        match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-bookworm", base)
        assert match, f"{image}: FROM {base} has no local stand-in"
        assert tuple(map(int, match.groups())) >= (3, 11, 3), f"{base}: redis 8 needs 3.11.3"


@pytest.mark.parametrize("image", ["gateway", "worker-cpu", "worker-gpu"])
def test_images_refuse_a_python_below_3_11_3(image: str) -> None:
    text = (ROOT / "docker" / f"{image}.Dockerfile").read_text(encoding="utf-8")
    assert "sys.version_info < (3, 11, 3)" in text


def test_gpu_image_fetches_no_python_outside_its_bases() -> None:
    text = (ROOT / "docker" / "worker-gpu.Dockerfile").read_text(encoding="utf-8").lower()
    assert "uv python install" not in text
    assert "astral" not in text
