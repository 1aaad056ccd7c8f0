"""`taskmux head train` / `head list`: heads as data, and what bad data gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from taskmux_api.kinds import HeadKind

from model.heads import LinearClassifierHead, TokenClassifierHead, load_heads
from model.manifest import load_manifest
from tests.unit.conftest import taskmux_cli

GOOD = ["great product, works well", "love it", "excellent quality", "fantastic value"]
BAD = ["broke after a day", "terrible quality", "waste of money", "awful support"]


def _rows(n: int = 20) -> list[tuple[str, str]]:
    return [(f"{t} #{i}", "good") for i in range(n) for t in GOOD[i % 4 : i % 4 + 1]] + [
        (f"{t} #{i}", "bad") for i in range(n) for t in BAD[i % 4 : i % 4 + 1]
    ]


def _write(path: Path, fmt: str) -> Path:
    rows = _rows()
    if fmt == "csv":
        path.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    elif fmt == "tsv":
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    else:
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_train_writes_a_versioned_head_the_worker_loads(
    repo: Path, tmp_path: Path, fmt: str
) -> None:
    data = _write(tmp_path / f"reviews.{fmt}", fmt)
    for version in ("1", "2"):
        run = taskmux_cli(
            "head", "train", "--name", "review", "--data", str(data), "--repo", str(repo)
        )
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["metrics"]["heldout_accuracy"] >= 0.5
        manifest = load_manifest(repo)  # verifies every checksum
        head = manifest.head("review")
        assert head is not None and head.kind == HeadKind.CLASSIFICATION and head.version == version
        assert set(head.labels) == {"good", "bad"}
    loaded = load_heads(repo, manifest)["review"]
    assert isinstance(loaded, LinearClassifierHead)
    listing = taskmux_cli("head", "list", "--repo", str(repo))
    assert listing.returncode == 0 and "review" in listing.stdout


def test_token_head_from_conll(repo: Path, tmp_path: Path) -> None:
    sentences = [
        "Anna###B-PER lives###O in###O Oslo###B-LOC",
        "Bob###B-PER visited###O Rome###B-LOC today###O",
    ]
    data = tmp_path / "tiny.conll"
    data.write_text("\n".join(sentences * 15) + "\n")
    run = taskmux_cli(
        "head",
        "train",
        "--kind",
        "token",
        "--name",
        "places",
        "--data",
        str(data),
        "--repo",
        str(repo),
    )
    assert run.returncode == 0, run.stderr
    manifest = load_manifest(repo)
    head = manifest.head("places")
    assert head is not None and head.kind == HeadKind.TOKEN_CLASSIFICATION
    assert isinstance(load_heads(repo, manifest)["places"], TokenClassifierHead)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "empty"),
        ("one.csv", b"text,label\na,x\nb,x\nc,x\n", "one label"),
        ("cols.csv", b"words,tag\na,x\nb,y\n", "column"),
        ("latin1.csv", "text,label\ncaf\xe9,x\nthé,y\n".encode("latin-1"), "UTF-8"),
        ("data.xlsx", b"text,label\na,x\nb,y\n", "extension"),
    ],
)
def test_bad_data_is_refused_and_writes_nothing(
    repo: Path, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*")}
    data = tmp_path / name
    data.write_bytes(content)
    run = taskmux_cli("head", "train", "--name", "review", "--data", str(data), "--repo", str(repo))
    assert run.returncode == 2
    assert message.lower() in run.stderr.lower(), run.stderr
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*")} == before


@pytest.mark.parametrize(
    ("name", "message"),
    [("Bad Name", "name"), ("embed", "built-in"), ("sentiment", "cannot become")],
)
def test_bad_names_and_kind_changes_are_refused(
    repo: Path, tmp_path: Path, name: str, message: str
) -> None:
    data = tmp_path / "tiny.conll"
    data.write_text("Anna###B-PER lives###O\n" * 20)
    run = taskmux_cli(
        "head", "train", "--kind", "token", "--name", name, "--data", str(data), "--repo", str(repo)
    )
    assert run.returncode == 2, run.stdout
    assert message in run.stderr
    assert load_manifest(repo).head("sentiment").kind == HeadKind.CLASSIFICATION  # type: ignore[union-attr]
