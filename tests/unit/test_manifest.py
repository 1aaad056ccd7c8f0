"""Loading and verifying a model repository: what a worker refuses, and why."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from taskmux_api.kinds import HeadKind

from model.heads import EmbeddingHead, LinearClassifierHead, load_heads
from model.manifest import (
    MANIFEST_FILE,
    Manifest,
    ModelRepoError,
    load_manifest,
    sha256_file,
    write_manifest,
)
from taskmux.modelrepo.build import BUILTIN_HEADS, trained_heads


@pytest.fixture
def repo(model_repo: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the built repository (the encoder is ~90 MB, so it is removed after)."""
    copy = tmp_path / "repo"
    shutil.copytree(model_repo, copy)
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def manifest_data(repo: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((repo / MANIFEST_FILE).read_text(encoding="utf-8"))
    return data


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def classification_head_file(manifest: Manifest) -> str:
    files = [h.weights_file for h in manifest.heads if h.kind == HeadKind.CLASSIFICATION]
    assert files, "the built repository has no classification head (make model builds one)"
    return files[0]


def test_built_repository_loads_with_every_head(repo: Path) -> None:
    manifest = load_manifest(repo)
    expected = {h.name for h in BUILTIN_HEADS} | {spec.name for spec, _ in trained_heads()}
    assert {h.name for h in manifest.heads} == expected
    heads = load_heads(repo, manifest)
    vectors = np.eye(3, manifest.encoder.dimension, dtype=np.float32)
    for name, head in heads.items():
        if not isinstance(head, EmbeddingHead | LinearClassifierHead):
            continue
        out = head.apply(vectors)
        assert out.shape[0] == 3, name
        if head.spec.kind == HeadKind.CLASSIFICATION:
            assert out.shape[1] == len(head.spec.labels)
            np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("which", ["tokenizer", "head weights"])
def test_flipped_byte_is_a_checksum_mismatch(repo: Path, which: str) -> None:
    manifest = load_manifest(repo)
    if which == "tokenizer":
        rel = manifest.encoder.tokenizer_file
    else:
        rel = classification_head_file(manifest)
    flip_byte(repo / rel)
    with pytest.raises(ModelRepoError, match="checksum mismatch") as err:
        load_manifest(repo)
    assert rel in str(err.value)


def test_missing_file_is_reported(repo: Path) -> None:
    rel = load_manifest(repo).encoder.tokenizer_file
    (repo / rel).unlink()
    with pytest.raises(ModelRepoError, match="missing") as err:
        load_manifest(repo)
    assert rel in str(err.value)


def test_missing_manifest_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelRepoError, match="no model repository"):
        load_manifest(tmp_path)


def test_file_without_checksum_is_refused(repo: Path) -> None:
    manifest = load_manifest(repo)
    checksums = dict(manifest.checksums)
    del checksums[manifest.encoder.model_file]
    write_manifest(repo, Manifest(manifest.encoder, manifest.heads, checksums))
    with pytest.raises(ModelRepoError, match="no checksum for"):
        load_manifest(repo)


def test_malformed_json_is_refused(repo: Path) -> None:
    (repo / MANIFEST_FILE).write_text('{"schema_version": 1, "encoder": ', encoding="utf-8")
    with pytest.raises(ModelRepoError, match="not valid JSON"):
        load_manifest(repo)


def test_missing_field_is_refused(repo: Path) -> None:
    data = manifest_data(repo)
    del data["encoder"]
    (repo / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelRepoError, match="malformed manifest"):
        load_manifest(repo)


def test_unsupported_schema_version_is_refused(repo: Path) -> None:
    data = manifest_data(repo)
    data["schema_version"] = 3  # 2 added the split encoder; 3 does not exist yet
    (repo / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelRepoError, match="schema_version 3 is not supported"):
        load_manifest(repo)


@pytest.mark.parametrize(
    ("weight_shape", "bias_shape"),
    [((2, 383), (2,)), ((3, 384), (2,)), ((2, 384), (3,))],
)
def test_classification_head_of_wrong_shape_is_refused(
    repo: Path, weight_shape: tuple[int, int], bias_shape: tuple[int]
) -> None:
    manifest = load_manifest(repo)
    rel = classification_head_file(manifest)
    with (repo / rel).open("wb") as f:
        np.savez(
            f, weight=np.zeros(weight_shape, np.float32), bias=np.zeros(bias_shape, np.float32)
        )
    # Re-sign the file, so that only the shape check can catch it.
    checksums = {**manifest.checksums, rel: sha256_file(repo / rel)}
    write_manifest(repo, Manifest(manifest.encoder, manifest.heads, checksums))
    manifest = load_manifest(repo)
    with pytest.raises(ModelRepoError, match="do not match"):
        load_heads(repo, manifest)


def test_unreadable_head_weights_are_refused(repo: Path) -> None:
    manifest = load_manifest(repo)
    rel = classification_head_file(manifest)
    (repo / rel).write_bytes(b"not a zip file")
    checksums = {**manifest.checksums, rel: sha256_file(repo / rel)}
    write_manifest(repo, Manifest(manifest.encoder, manifest.heads, checksums))
    with pytest.raises(ModelRepoError, match="cannot read"):
        load_heads(repo, load_manifest(repo))
