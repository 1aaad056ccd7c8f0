"""User heads on a branch: `head train --features`, a head's own branch in the manifest,
what each branch costs, and a worker opening and closing heads' branches as it runs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model.loaded import LoadedModel
from model.manifest import (
    EMBEDDING,
    FP32,
    MULTITASK,
    HeadSpec,
    Manifest,
    ModelRepoError,
    PartFile,
    load_manifest,
    sha256_file,
    write_manifest,
)
from model.variants import FP16, INT8
from taskmux.modelrepo.headstore import Branch, add_head_version
from tests.unit.conftest import taskmux_cli
from workers.reload import reload_heads
from workers.settings import WorkerSettings

NOUNS = ["film", "plot", "cast", "ending", "script", "score", "pacing", "humour", "story", "hero"]
GOOD = ["wonderful", "moving", "brilliant", "delightful", "superb", "gripping", "charming"]
BAD = ["dreadful", "boring", "clumsy", "tedious", "awful", "dull", "painful"]


def write_reviews(path: Path) -> Path:
    """140 distinct labelled sentences, half of each label."""
    rows = [(f"the {n} was {a}", "pos") for n in NOUNS for a in GOOD]
    rows += [(f"the {n} was {a}", "neg") for n in NOUNS for a in BAD]
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return path


def _train(repo: Path, data: Path, name: str, *flags: str) -> tuple[int, str, str]:
    run = taskmux_cli(
        "head", "train", "--name", name, "--data", str(data), "--repo", str(repo), *flags
    )
    return run.returncode, run.stdout, run.stderr


def one_graph(repo: Path) -> Path:
    """`repo` as a build without the multi-task branch writes it: one graph, no parts."""
    manifest = load_manifest(repo)
    encoder = replace(
        manifest.encoder,
        parts={},
        branch_layer=0,
        variants={n: replace(v, parts={}) for n, v in manifest.encoder.variants.items()},
    )
    heads = tuple(replace(h, features=EMBEDDING) for h in manifest.heads)
    write_manifest(repo, replace(manifest, encoder=encoder, heads=heads))
    return repo


# --- head train ------------------------------------------------------------------------


def test_a_head_on_the_multitask_branch_records_it(repo: Path, tmp_path: Path) -> None:
    data = write_reviews(tmp_path / "reviews.jsonl")
    code, out, err = _train(repo, data, "reviews", "--features", MULTITASK)
    assert code == 0, err
    report = json.loads(out)
    assert report["features"] == MULTITASK and report["metrics"]["heldout_accuracy"] >= 0.8
    head = load_manifest(repo).head("reviews")
    assert head is not None and head.features == MULTITASK
    listing = taskmux_cli("head", "list", "--repo", str(repo)).stdout
    assert "multitask" in next(line for line in listing.splitlines() if "reviews" in line)


def test_multitask_features_and_fine_tune_need_a_split_encoder(repo: Path, tmp_path: Path) -> None:
    data = write_reviews(tmp_path / "reviews.jsonl")
    before = (one_graph(repo) / "manifest.json").read_bytes()
    code, _, err = _train(repo, data, "reviews", "--features", MULTITASK)
    assert code == 2 and "has no multi-task branch" in err and "--features embedding" in err
    code, _, err = _train(repo, data, "reviews", "--fine-tune")
    assert code == 2 and "no split encoder" in err and "nothing was written" in err
    assert (repo / "manifest.json").read_bytes() == before
    assert not (repo / "heads" / "reviews").exists()


def test_fine_tune_refuses_options_it_does_not_use(repo: Path, tmp_path: Path) -> None:
    data = write_reviews(tmp_path / "reviews.jsonl")
    code, _, err = _train(repo, data, "reviews", "--fine-tune", "--features", MULTITASK)
    assert code == 2 and "drop --features" in err


# --- manifest: parts, branches, cost ---------------------------------------------------


def test_cost_is_the_branch_share_of_a_full_pass(model_repo: Path) -> None:
    spec = load_manifest(model_repo).encoder.with_layer_counts(6)
    assert spec.parts["trunk"].layers == spec.branch_layer == 2
    assert spec.branch_cost(EMBEDDING) == spec.branch_cost(MULTITASK) == pytest.approx(0.6667)
    assert replace(spec, parts={}).branch_cost(EMBEDDING) == 1.0  # one graph: the whole pass
    unrecorded = {n: replace(p, layers=0) for n, p in spec.parts.items()}
    assert replace(spec, parts=unrecorded).branch_cost(MULTITASK) == 0.0  # schema 2 before it


def test_manifests_without_layer_counts_still_load(model_repo: Path) -> None:
    data = json.loads((model_repo / "manifest.json").read_text())
    for part in data["encoder"]["parts"].values():
        part.pop("layers", None)
    manifest = Manifest.from_dict(data)
    assert all(p.layers == 0 for p in manifest.encoder.parts.values())
    assert manifest.encoder.branch_cost(EMBEDDING) == 0.0


def test_a_heads_branch_is_a_part_and_other_names_are_refused(model_repo: Path) -> None:
    data = json.loads((model_repo / "manifest.json").read_text())
    data["encoder"]["parts"]["reviews-v3"] = {"file": "heads/reviews/3/branch.onnx", "sha256": "0"}
    for variant in data["encoder"]["variants"].values():
        variant["parts"]["reviews-v3"] = {"file": "x", "sha256": "0"}
    data["heads"][0]["features"] = "reviews-v3"
    assert Manifest.from_dict(data).encoder.user_branches() == ["reviews-v3"]
    data["heads"][0]["features"] = "reviews-v4"
    with pytest.raises(ModelRepoError, match="reviews-v4 branch, which the encoder"):
        Manifest.from_dict(data)
    data["encoder"]["parts"]["reviews"] = data["encoder"]["parts"].pop("reviews-v3")
    with pytest.raises(ModelRepoError, match="neither built parts nor heads' branches"):
        Manifest.from_dict(data)


# --- a worker opens and closes heads' branches -----------------------------------------


def copy_of_multitask_branch(repo: Path, name: str, version: int) -> Branch:
    """The multi-task branch's files copied as a head's own branch (same outputs)."""
    encoder = load_manifest(repo).encoder
    files = {}
    for variant, part in encoder.branch_files(MULTITASK).items():
        rel = f"heads/{name}/{version}/branch{'' if variant == FP32 else '.' + variant}.onnx"
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / part.file, repo / rel)
        files[variant] = PartFile(rel, sha256_file(repo / rel), 4)
    return Branch(version, f"{name}-v{version}", files, 6)


def _head_like(repo: Path, source: str, name: str, features: str) -> tuple[HeadSpec, dict]:  # type: ignore[type-arg]
    spec = load_manifest(repo).head(source)
    assert spec is not None
    with np.load(repo / spec.weights_file) as data:
        params = {k: data[k] for k in data.files}
    return replace(spec, name=name, features=features), params


def test_a_worker_opens_a_heads_branch_and_closes_it_when_unread(repo: Path) -> None:
    model = LoadedModel.load(WorkerSettings(model_repo=repo))
    branch = copy_of_multitask_branch(repo, "mood", 1)
    head, params = _head_like(repo, "sentiment", "mood", branch.name)
    add_head_version(repo, head, params, branch=branch)
    written = load_manifest(repo)  # verifies the branch's files in every variant
    assert sorted(written.encoder.variants[INT8].parts) == sorted(
        written.encoder.variants[FP16].parts
    )
    assert written.encoder.branch_cost(branch.name) == pytest.approx(0.6667)

    first = reload_heads(model, repo)
    assert (
        branch.name in first.encoder.branch_names and branch.name not in model.encoder.branch_names
    )
    assert first.encoder.session is model.encoder.session  # the trunk is shared, not reopened
    texts = ["a wonderful film", "a dreadful film"]
    own, _ = first.encoder.encode(texts, branch=branch.name)
    shipped, _ = first.encoder.encode(texts, branch=MULTITASK)
    np.testing.assert_allclose(own, shipped, atol=1e-5)  # a copy answers as the original

    plain, _ = _head_like(repo, "sentiment", "mood", EMBEDDING)
    add_head_version(repo, plain, params)  # version 2 reads the embedding branch
    second = reload_heads(first, repo)
    assert second.heads["mood"].spec.version == "2"
    assert branch.name not in second.encoder.branch_names
    assert branch.name not in load_manifest(repo).encoder.parts
    assert (repo / branch.files[FP32].file).is_file()  # version 1's files stay, as weights do


def test_a_corrupt_branch_is_refused_and_the_worker_keeps_serving(repo: Path) -> None:
    model = LoadedModel.load(WorkerSettings(model_repo=repo))
    branch = copy_of_multitask_branch(repo, "mood", 1)
    head, params = _head_like(repo, "sentiment", "mood", branch.name)
    add_head_version(repo, head, params, branch=branch)
    (repo / branch.files[model.encoder.variant].file).write_bytes(b"not onnx")
    reloaded = reload_heads(model, repo)
    assert "mood" not in reloaded.heads and "sentiment" in reloaded.heads
    assert reloaded.encoder is model.encoder
