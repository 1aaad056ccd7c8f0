"""Encoder variants: int8 stays close to fp32, `auto` follows the accuracy rule, a variant
that cannot run is refused at start, and variant files are checksummed like the rest."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from taskmux_api.kinds import HeadKind

from model.encoder import Encoder, l2_normalize, run_bound
from model.loaded import LoadedModel
from model.manifest import (
    MANIFEST_FILE,
    EncoderSpec,
    HeadSpec,
    Manifest,
    ModelRepoError,
    PartFile,
    VariantSpec,
    load_manifest,
)
from model.variants import (
    CPU,
    CUDA,
    FLOOR_FAILURES,
    LOSS_PREFIX,
    VariantError,
    int8_verdict,
    select_variant,
    variant_paths,
)
from taskmux.modelrepo.headstore import add_head_version
from taskmux.modelrepo.quantize import record_metrics, recorded_metrics, with_recorded_metrics
from workers.settings import WorkerSettings

TEXTS = [
    "A gripping, beautifully acted film.",
    "I want my money back.",
    "how do i transfer money to my savings account",
    "Oil prices rose on Tuesday as traders worried about supplies from the Middle East.",
    "Peter Blackburn, the EU spokesman, spoke in Brussels on Friday.",
    "The service was slow but the food made up for it.",
]
# Measured on TEXTS with the recipe of taskmux.modelrepo.quantize: mean 0.9954, min 0.9938
# (over 400 held-out texts: mean 0.9955, min 0.9918). The floors sit a little below.
INT8_MIN_COSINE = 0.985
INT8_MEAN_COSINE = 0.99
FP16_MIN_COSINE = 0.999  # on CPU; CUDA's half-precision kernels are not tested here

ACCEPTED = {LOSS_PREFIX + "entities.f1": 0.8, LOSS_PREFIX + "topic.accuracy": -0.2}
REJECTED = {LOSS_PREFIX + "entities.f1": 1.5, LOSS_PREFIX + "topic.accuracy": 0.1}


def needs(model_repo: Path, *variants: str) -> EncoderSpec:
    spec = load_manifest(model_repo, verify=False).encoder
    missing = [v for v in variants if v not in spec.variants]
    if missing:
        pytest.fail(f"the model repository has no {missing} variant: rebuild it with `make model`")
    return spec


@pytest.fixture
def repo(model_repo: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the repository; files are hard links, so detach before editing."""
    copy = tmp_path / "repo"
    shutil.copytree(model_repo, copy, copy_function=os.link)
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def detach(path: Path) -> None:
    """Replace a hard link by a private copy, so editing it leaves the shared file alone."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


def spec_with(**variants: VariantSpec) -> EncoderSpec:
    return EncoderSpec("enc", "1", 4, 8, "encoder/model.onnx", "t.json", variants=variants)


def int8(metrics: dict[str, float]) -> VariantSpec:
    return VariantSpec("encoder/model.int8.onnx", "0" * 64, "test", metrics)


FP16 = VariantSpec("encoder/model.fp16.onnx", "0" * 64)


# --- numbers -------------------------------------------------------------------------------


def test_int8_sentence_vectors_stay_close_to_fp32(model_repo: Path) -> None:
    spec = needs(model_repo, "int8")
    fp32 = Encoder(model_repo, spec, providers=[CPU])
    quantised = Encoder(model_repo, spec, providers=[CPU], variant="int8")
    assert (fp32.variant, quantised.variant) == ("fp32", "int8")
    cosines = np.sum(
        l2_normalize(fp32.encode(TEXTS)[0]) * l2_normalize(quantised.encode(TEXTS)[0]), axis=1
    )
    assert cosines.min() >= INT8_MIN_COSINE
    assert cosines.mean() >= INT8_MEAN_COSINE


# Long neighbours pad a short text's row by several times its length in the same call.
NEIGHBOURS = [" ".join(TEXTS[i:] + TEXTS[:i]) for i in range(3)]
BATCH_INVARIANCE_MIN_COSINE = 0.9999  # fp32 gives 1.0 to float rounding


def test_int8_vector_of_a_text_does_not_depend_on_its_batch(model_repo: Path) -> None:
    """Static scales: the same text alone and padded among long texts gives one vector
    (dynamic int8, one activation scale per call, gave cosines down to 0.984)."""
    spec = needs(model_repo, "int8")
    quantised = Encoder(model_repo, spec, providers=[CPU], variant="int8")
    for branch in quantised.branch_names:
        for text in TEXTS:
            alone = quantised.encode([text], branch=branch)[0]
            batch = [text, *NEIGHBOURS]
            # No split on padding: the short text must share the long texts' call.
            mixed, stats = quantised.encode(batch, branch=branch, min_padding_efficiency=0.0)
            assert stats.batches == 1
            cosine = float(np.sum(l2_normalize(alone)[0] * l2_normalize(mixed)[0]))
            assert cosine >= BATCH_INVARIANCE_MIN_COSINE, (branch, text, cosine)


def test_fp16_file_runs_with_fp32_inputs_and_outputs(model_repo: Path) -> None:
    spec = needs(model_repo, "fp16")
    fp32 = Encoder(model_repo, spec, providers=[CPU])
    # select_variant refuses fp16 without CUDA, so open the file directly: this checks the
    # conversion (fused graph, fp32 I/O), not the GPU's numbers.
    session = ort.InferenceSession(str(model_repo / spec.variants["fp16"].file), providers=[CPU])
    encodings = fp32.tokenizer.encode_batch(TEXTS[:3])
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((3, width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)], mask[row, : len(e.ids)] = e.ids, e.attention_mask
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (pooled,) = session.run(["pooled"], feeds)
    assert pooled.dtype == np.float32
    cosines = np.sum(l2_normalize(pooled) * l2_normalize(fp32.encode(TEXTS[:3])[0]), axis=1)
    assert cosines.min() >= FP16_MIN_COSINE


def test_io_binding_gives_what_run_gives(model_repo: Path) -> None:
    spec = load_manifest(model_repo, verify=False).encoder
    session = ort.InferenceSession(str(model_repo / spec.model_file), providers=[CPU])
    ids = np.array([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}
    feeds["token_type_ids"] = np.zeros_like(ids)
    names = ["pooled", "token_embeddings"]
    bound = run_bound(session, feeds, names, "cpu")
    plain = session.run(names, feeds)
    for got, expected in zip(bound, plain, strict=True):
        np.testing.assert_array_equal(got, expected)


# --- the accuracy rule and selection -------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "accepted", "says"),
    [
        ({}, False, "not been evaluated"),
        (ACCEPTED, True, "0.80 points (entities.f1)"),
        (REJECTED, False, "1.50 points on entities.f1"),
        ({**ACCEPTED, FLOOR_FAILURES: 1.0}, False, "floor"),
        ({LOSS_PREFIX + "topic.accuracy": float("nan")}, False, "nan"),
    ],
)
def test_int8_verdict(metrics: dict[str, float], accepted: bool, says: str) -> None:
    ok, why = int8_verdict(metrics)
    assert ok is accepted
    assert says in why


@pytest.mark.parametrize(
    ("variants", "providers", "variant", "chosen"),
    [
        ({"int8": int8(ACCEPTED), "fp16": FP16}, [CPU], "int8", [CPU]),
        ({"int8": int8(REJECTED), "fp16": FP16}, [CPU], "fp32", [CPU]),
        ({"int8": int8({})}, [CPU], "fp32", [CPU]),
        ({}, [CPU], "fp32", [CPU]),
        ({"int8": int8(ACCEPTED), "fp16": FP16}, [CUDA, CPU], "fp16", [CUDA, CPU]),
        ({"int8": int8(ACCEPTED)}, [CUDA, CPU], "fp32", [CUDA, CPU]),
    ],
)
def test_auto(
    variants: dict[str, VariantSpec], providers: list[str], variant: str, chosen: list[str]
) -> None:
    selection = select_variant("auto", spec_with(**variants), providers)
    assert (selection.variant, selection.providers) == (variant, chosen)
    expected = "encoder/model.onnx" if variant == "fp32" else variants[variant].file
    assert selection.file == expected
    assert selection.reason.startswith("auto: ")


def test_auto_says_which_head_kept_int8_off() -> None:
    selection = select_variant("auto", spec_with(int8=int8(REJECTED)), [CPU])
    assert "entities.f1" in selection.reason and "1.50" in selection.reason


def test_explicit_variants() -> None:
    spec = spec_with(int8=int8(REJECTED), fp16=FP16)
    forced = select_variant("int8", spec, [CUDA, CPU])  # forced past the rule, on CPU
    assert (forced.variant, forced.providers) == ("int8", [CPU])
    assert select_variant("fp32", spec, [CUDA, CPU]).providers == [CUDA, CPU]
    assert select_variant("fp16", spec, [CUDA, CPU]).file == FP16.file


@pytest.mark.parametrize(
    ("requested", "variants", "providers", "message"),
    [
        ("fp16", {"fp16": FP16}, [CPU], "fp16 needs CUDAExecutionProvider"),
        ("fp16", {}, [CUDA, CPU], "fp16 is not in the model repository"),
        ("int8", {"fp16": FP16}, [CPU], "int8 is not in the model repository"),
        ("int4", {}, [CPU], "'int4' is not one of"),
    ],
)
def test_refused_variants(
    requested: str, variants: dict[str, VariantSpec], providers: list[str], message: str
) -> None:
    with pytest.raises(VariantError, match=message):
        select_variant(requested, spec_with(**variants), providers)


# --- the worker and the repository ---------------------------------------------------------


def test_worker_auto_follows_the_recorded_figures(model_repo: Path) -> None:
    spec = needs(model_repo, "int8")
    model = LoadedModel.load(WorkerSettings(model_repo=model_repo, providers=(CPU,)))
    accepted, _ = int8_verdict(spec.variants["int8"].metrics)
    assert model.encoder.variant == ("int8" if accepted else "fp32")
    assert model.encoder.provider == CPU


def test_worker_refuses_fp16_without_a_gpu(model_repo: Path) -> None:
    settings = WorkerSettings(model_repo=model_repo, encoder_variant="fp16", providers=(CPU,))
    with pytest.raises(VariantError, match="fp16 needs CUDAExecutionProvider"):
        LoadedModel.load(settings)


def test_old_manifest_without_variants_loads_fp32(repo: Path) -> None:
    data = json.loads((repo / MANIFEST_FILE).read_text(encoding="utf-8"))
    data["encoder"].pop("variants", None)
    for name in ("model.int8.onnx", "model.fp16.onnx"):
        (repo / "encoder" / name).unlink(missing_ok=True)
    (repo / MANIFEST_FILE).unlink()  # a hard link: replace it, do not write through it
    (repo / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    assert load_manifest(repo).encoder.variants == {}
    model = LoadedModel.load(WorkerSettings(model_repo=repo))
    assert model.encoder.variant == "fp32"
    with pytest.raises(VariantError, match="int8 is not in the model repository"):
        LoadedModel.load(WorkerSettings(model_repo=repo, encoder_variant="int8"))


def test_corrupt_variant_file_is_refused(repo: Path) -> None:
    spec = needs(repo, "int8")
    path = repo / spec.variants["int8"].file
    detach(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelRepoError, match=r"checksum mismatch for encoder/model\.int8\.onnx"):
        load_manifest(repo)
    with pytest.raises(ModelRepoError):
        LoadedModel.load(WorkerSettings(model_repo=repo, encoder_variant="fp32"))


def test_missing_variant_file_is_refused(repo: Path) -> None:
    spec = needs(repo, "fp16")
    (repo / spec.variants["fp16"].file).unlink()
    with pytest.raises(ModelRepoError, match=r"variant fp16 .* is missing"):
        load_manifest(repo)


def test_head_train_keeps_variants(repo: Path) -> None:
    """`head train` rewrites `checksums` knowing only the fp32 files; variants survive."""
    before = load_manifest(repo).encoder.variants
    head = HeadSpec(
        name="ticket-type", kind=HeadKind.CLASSIFICATION, version="0", labels=("a", "b")
    )
    params = {"weight": np.zeros((2, 384), np.float32), "bias": np.zeros(2, np.float32)}
    add_head_version(repo, head, params)
    after = load_manifest(repo)  # verifies every file, variants included
    assert after.head("ticket-type") is not None
    assert after.encoder.variants == before


def test_manifest_round_trip_and_unknown_variant() -> None:
    manifest = Manifest(encoder=spec_with(int8=int8(ACCEPTED), fp16=FP16), heads=())
    assert Manifest.from_json(manifest.to_json()) == manifest
    data = json.loads(manifest.to_json())
    data["encoder"]["variants"]["int4"] = data["encoder"]["variants"]["int8"]
    with pytest.raises(ModelRepoError, match="unknown encoder variant 'int4'"):
        Manifest.from_dict(data)


def test_variant_paths(model_repo: Path) -> None:
    paths = variant_paths(model_repo)
    assert next(iter(paths)) == "fp32"
    assert all(p.is_file() for p in paths.values())


def test_recorded_figures_apply_only_to_the_same_file(tmp_path: Path) -> None:
    record = tmp_path / "variants.json"
    entry = {"sha256": "a" * 64, "recipe": "r", "metrics": ACCEPTED}
    record.write_text(json.dumps({"int8": entry}), encoding="utf-8")
    assert recorded_metrics("int8", "a" * 64, record) == ACCEPTED
    assert recorded_metrics("int8", "b" * 64, record) == {}
    assert recorded_metrics("fp16", "a" * 64, record) == {}
    assert recorded_metrics("int8", "a" * 64, tmp_path / "absent.json") == {}


def test_recorded_figures_of_a_split_encoder_need_every_part_unchanged(tmp_path: Path) -> None:
    record = tmp_path / "variants.json"
    parts = {"trunk": PartFile("t.onnx", "b" * 64), "multitask": PartFile("m.onnx", "c" * 64)}
    built = VariantSpec("encoder/model.int8.onnx", "a" * 64, "r", {}, parts)
    record_metrics("int8", VariantSpec(**{**built.__dict__, "metrics": ACCEPTED}), record)
    assert with_recorded_metrics({"int8": built}, record)["int8"].metrics == ACCEPTED
    # A retrained branch: the heads' figures were measured on another multi-task graph.
    retrained = {**parts, "multitask": PartFile("m.onnx", "d" * 64)}
    changed = VariantSpec("encoder/model.int8.onnx", "a" * 64, "r", {}, retrained)
    assert with_recorded_metrics({"int8": changed}, record)["int8"].metrics == {}
