"""The split encoder: manifest schema 2, trunk + branches on ONNX Runtime, and which rows
the worker sends through which branch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from taskmux_api.kinds import HeadKind

from model.encoder import BranchRows, Encoder, l2_normalize
from model.manifest import (
    EMBEDDING,
    MULTITASK,
    PART_NAMES,
    Manifest,
    ModelRepoError,
    load_manifest,
)
from model.parts import TRUNK
from taskmux.modelrepo.multitask_store import branch_meta
from workers.tasks import Needs, branch_rows

CPU = "CPUExecutionProvider"
TEXTS = [
    "The quick brown fox jumps over the lazy dog near Berlin.",
    "I loved this movie",
    "what is my bank balance",
    "ok",
]


@pytest.fixture(scope="module")
def manifest(model_repo: Path) -> Manifest:
    return load_manifest(model_repo)


@pytest.fixture(scope="module")
def split_manifest(manifest: Manifest) -> Manifest:
    if not manifest.encoder.parts:
        if branch_meta() is not None:
            pytest.fail("a multi-task branch is committed but the test repository has no parts")
        pytest.skip("no multi-task branch is committed: the repository is one graph")
    return manifest


def _data(manifest: Manifest) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest.to_json())
    return data


# --- manifest --------------------------------------------------------------------------


def test_schema_1_manifests_load_with_every_head_on_the_embedding_branch(
    manifest: Manifest,
) -> None:
    data = _data(manifest)
    data["schema_version"] = 1
    data["encoder"].pop("parts", None)
    data["encoder"].pop("branch_layer", None)
    for variant in data["encoder"].get("variants", {}).values():
        variant.pop("parts", None)
    for head in data["heads"]:
        head.pop("features", None)
    old = Manifest.from_dict(data)
    assert {h.features for h in old.heads} == {EMBEDDING}
    assert old.encoder.parts == {}


def test_a_head_on_a_branch_the_encoder_lacks_is_refused(manifest: Manifest) -> None:
    data = _data(manifest)
    data["encoder"]["parts"] = {}
    for variant in data["encoder"].get("variants", {}).values():
        variant["parts"] = {}
    trained = next(h for h in data["heads"] if h["kind"] == HeadKind.CLASSIFICATION)
    trained["features"] = MULTITASK
    with pytest.raises(ModelRepoError, match="reads the multitask branch"):
        Manifest.from_dict(data)


def test_unknown_features_are_refused(manifest: Manifest) -> None:
    data = _data(manifest)
    data["heads"][0]["features"] = "mystery"
    with pytest.raises(ModelRepoError, match="unknown features"):
        Manifest.from_dict(data)


def test_every_variant_covers_every_part(split_manifest: Manifest) -> None:
    encoder = split_manifest.encoder
    assert sorted(encoder.parts) == sorted(PART_NAMES)
    assert encoder.variants, "the build makes int8 and fp16"
    for name, variant in encoder.variants.items():
        assert sorted(variant.parts) == sorted(PART_NAMES), name
    data = _data(split_manifest)
    next(iter(data["encoder"]["variants"].values()))["parts"].pop(MULTITASK)
    with pytest.raises(ModelRepoError, match=r"encoder parts \['embedding', 'trunk'\] are not"):
        Manifest.from_dict(data)


def test_trained_heads_read_the_multitask_branch(split_manifest: Manifest) -> None:
    features = {h.name: h.features for h in split_manifest.heads}
    assert features["embed"] == EMBEDDING
    assert {features[n] for n in ("sentiment", "intent", "topic", "entities")} == {MULTITASK}


# --- encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_trunk_plus_embedding_branch_is_the_original_encoder(
    model_repo: Path, split_manifest: Manifest, variant: str
) -> None:
    spec = split_manifest.encoder
    variants = {name: replace(v, parts={}) for name, v in spec.variants.items()}
    one_graph = replace(spec, parts={}, variants=variants)
    cpu = ["CPUExecutionProvider"]
    whole = Encoder(model_repo, one_graph, providers=cpu, variant=variant)
    parts = Encoder(model_repo, spec, providers=cpu, variant=variant)
    assert parts.parts is not None and whole.parts is None
    a, _ = whole.encode(TEXTS)
    b, _ = parts.encode(TEXTS)
    cosine = (l2_normalize(a) * l2_normalize(b)).sum(axis=1)
    assert cosine.min() >= 0.999
    states_a = whole.encode_tokens(TEXTS[:1])[0][0]
    states_b = parts.encode_tokens(TEXTS[:1])[0][0]
    assert np.allclose(states_a, states_b, atol=1e-3 if variant == "int8" else 1e-4)


@pytest.mark.parametrize("branch", [EMBEDDING, MULTITASK])
def test_fp16_parts_compute_what_fp32_parts_compute(
    model_repo: Path, split_manifest: Manifest, branch: str
) -> None:
    # fp16 runs on GPUs only in the worker (select_variant refuses it on CPU), and this
    # machine has none: opening the graphs on CPU checks the conversion of each part (fp32
    # I/O, fused layers, the hidden states handed from trunk to branch), not a GPU's numbers.
    spec = split_manifest.encoder
    fp16 = spec.variants["fp16"].parts
    fp32 = Encoder(model_repo, spec, providers=["CPUExecutionProvider"])
    trunk = ort.InferenceSession(str(model_repo / fp16[TRUNK].file), providers=[CPU])
    upper = ort.InferenceSession(str(model_repo / fp16[branch].file), providers=[CPU])
    vectors = []
    for encoding in fp32.tokenizer.encode_batch(TEXTS):
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.ones_like(ids)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = trunk.run(None, feeds)
        (pooled,) = upper.run(["pooled"], {"hidden": hidden, "attention_mask": mask})
        assert pooled.dtype == np.float32
        vectors.append(pooled[0])
    expected, _ = fp32.encode(TEXTS, branch=branch)
    cosine = (l2_normalize(np.array(vectors)) * l2_normalize(expected)).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_each_branch_runs_only_for_its_rows(model_repo: Path, split_manifest: Manifest) -> None:
    encoder = Encoder(model_repo, split_manifest.encoder, providers=["CPUExecutionProvider"])
    encoded = encoder.encode_full(
        TEXTS,
        branches={EMBEDDING: BranchRows([0, 1]), MULTITASK: BranchRows([1, 2, 3], [2])},
    )
    embedding, multitask = encoded.features(EMBEDDING), encoded.features(MULTITASK)
    assert np.flatnonzero(np.abs(embedding.pooled).sum(axis=1)).tolist() == [0, 1]
    assert np.flatnonzero(np.abs(multitask.pooled).sum(axis=1)).tolist() == [1, 2, 3]
    assert sorted(multitask.token_states) == [2] and embedding.token_states == {}
    # The branches differ: the multi-task one was fine-tuned.
    cosine = float((l2_normalize(embedding.pooled) * l2_normalize(multitask.pooled))[1].sum())
    assert cosine < 0.999


# --- worker ----------------------------------------------------------------------------


def test_branch_rows_send_each_text_through_the_branches_its_jobs_read() -> None:
    row_of = {t: i for i, t in enumerate(["a", "b", "c"])}
    needs = [
        Needs(("a",)),  # embed
        Needs(("b",), (), frozenset({MULTITASK}), frozenset()),  # classify on the branch
        Needs(("c", "b"), ("c", "b"), frozenset({MULTITASK}), frozenset({MULTITASK})),
    ]
    rows = branch_rows(needs, row_of)
    assert list(rows[EMBEDDING].pooled) == [0] and list(rows[EMBEDDING].tokens) == []
    assert list(rows[MULTITASK].pooled) == [1, 2] and list(rows[MULTITASK].tokens) == [1, 2]


def test_list_tasks_says_which_branch_each_head_reads(manifest: Manifest) -> None:
    from gateway.service import _head_info

    for head in manifest.heads:
        assert _head_info(head, manifest.encoder).features == head.features
    on_branch = replace(manifest.heads[0], features=MULTITASK)
    assert _head_info(on_branch, manifest.encoder).features == MULTITASK
