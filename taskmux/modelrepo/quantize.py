"""Make the encoder's variants from its fp32 export: int8 for CPU, fp16 for CUDA.

Both are built on CPU in a few seconds and are deterministic: the same fp32 file and the
same onnxruntime give byte-identical variants. That is what lets an evaluation travel with
the code: `taskmux model eval --variant int8` stores its figures in `VARIANT_RECORD` (in
git) under the int8 file's SHA-256, and every later build that produces that same file
copies them into the manifest. A different file (new onnxruntime, new recipe) starts
unevaluated, so `auto` keeps fp32 until someone evaluates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model.manifest import ModelRepoError, PartFile, VariantSpec, sha256_file
from model.parts import TRUNK, Feeds
from model.variants import FP16, INT8
from taskmux.modelrepo.calibration import (
    MAX_TOKENS,
    branch_feeds,
    calibration_texts,
    feed_reader,
    token_feeds,
)
from taskmux.modelrepo.smoothing import ALPHA, smooth_matmuls

log = logging.getLogger(__name__)

VARIANT_RECORD = Path(__file__).parent / "trained" / "encoder" / "variants.json"
VARIANT_FILES = {INT8: "encoder/model.int8.onnx", FP16: "encoder/model.fp16.onnx"}

# The int8 recipe: static (calibrated) activation scales, so that a text's vector does not
# depend on its batch; what it quantises and what it keeps in fp32 is what held its
# vectors at cosine >= 0.99 to fp32 for 1.8x fp32's speed (the experiments are in the
# commit message that introduced it, their figures in MODEL_CARD.md):
# - only MatMuls with a weight: the attention score MatMuls (activation x activation, with
#   wide ranges) stay fp32, as they did in the dynamic recipe;
# - no quantised MatMul outputs: a Q/DQ pair after each MatMul (the quantiser's default)
#   took the cosine to fp32 from 0.990 to 0.943 mean;
# - the feed-forward inputs smoothed (smoothing.py): with them
#   quantised unsmoothed the worst cosine was 0.980, and keeping the feed-forward input
#   fp32 instead cost a third of the speed-up. Smoothing query/key/value inputs as well
#   took sentence cosines from 0.9955 / 0.991 (mean / min) to 0.997 / 0.993 but the heads
#   lost more (entities f1 -0.70 points instead of -0.60, oos recall -1.00 instead of 0);
# - layer 0's feed-forward output stays fp32 (post-GELU outliers; smoothing it too took
#   the worst cosine to 0.944).
INT8_SKIPPED = ("attention/self/MatMul",)  # matches MatMul and MatMul_1 of every layer
INT8_SMOOTHED = ("intermediate/dense/MatMul",)
INT8_FP32_NODES = ("/inner/encoder/layer.0/output/dense/MatMul",)

# The packaged export's geometry, for the transformer optimiser's fusions.
NUM_HEADS = 12
HIDDEN_SIZE = 384


@dataclass(frozen=True)
class Geometry:
    """What the variant recipes need to know of an export (default: the packaged one)."""

    num_heads: int = NUM_HEADS
    hidden_size: int = HIDDEN_SIZE


PACKAGED = Geometry()


def build_int8(
    src: Path, dst: Path, feeds: Sequence[Feeds], keep_fp32: Sequence[str] = INT8_FP32_NODES
) -> str:
    """Quantise `src` to `dst` with scales calibrated on `feeds`; returns the recipe."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    names = {node.name for node in onnx.load(str(src), load_external_data=False).graph.node}
    missing = set(keep_fp32) - names
    if missing:  # an export with other node names would silently quantise them
        raise RuntimeError(f"int8 recipe names nodes the export lacks: {sorted(missing)}")
    skipped = [n for n in names if any(p in n for p in INT8_SKIPPED)]
    with tempfile.TemporaryDirectory() as tmp:
        smoothed = Path(tmp) / "smoothed.onnx"
        smooth_matmuls(src, smoothed, feeds, INT8_SMOOTHED)
        # Per-channel weights: per-tensor scales lose too much (cosine to fp32 0.96 vs 0.99).
        # uint8 activations with int8 weights: the fast pairing of x86's VNNI kernels. No
        # reduce_range: it guards AVX2 CPUs without VNNI, whose u8s8 kernels can saturate;
        # the CPUs measured here have avx512_vnni.
        # MinMax over unpadded single texts: no padding row ever widens a range.
        # No quant_pre_process: its symbolic shape inference fails on this export.
        quantize_static(
            str(smoothed),
            str(dst),
            feed_reader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*skipped, *keep_fp32],
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
        )
    return (
        f"onnxruntime {onnxruntime.__version__} quantize_static (QDQ, MinMax on "
        f"{len(feeds)} training texts): QInt8 weights per channel, QUInt8 activations per "
        f"tensor, MatMuls with weights only, float outputs, SmoothQuant alpha {ALPHA} on "
        f"{', '.join(INT8_SMOOTHED)}, fp32 kept for {', '.join(keep_fp32) or 'none'}"
    )


def build_fp16(
    src: Path, dst: Path, *, require_attention: bool = True, geometry: Geometry = PACKAGED
) -> str:
    """Fuse attention and layer norms, then convert to float16 (fp32 I/O); the recipe."""
    import onnxruntime
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(
        str(src),
        model_type="bert",
        num_heads=geometry.num_heads,
        hidden_size=geometry.hidden_size,
        opt_level=0,  # the Python fusions only; ORT's own run when the session loads
        use_gpu=True,
    )
    fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    if require_attention and not fused.get("Attention"):
        raise RuntimeError(f"the optimiser fused no attention ({fused}); fp16 would be slow")
    # keep_io_types: the inputs stay int64 and the outputs float32, so the worker's code
    # is the same for every variant.
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(fused.items()))
    return (
        f"onnxruntime {onnxruntime.__version__} transformers optimizer (bert, "
        f"{geometry.num_heads} heads, hidden {geometry.hidden_size}: {ops}), then float16 "
        "with fp32 inputs/outputs"
    )


TOKENIZER_FILE = "encoder/tokenizer.json"


def calibration_feeds(repo: Path, data_dir: Path, max_tokens: int = MAX_TOKENS) -> list[Feeds]:
    """The encoder's inputs for the calibration texts, with `repo`'s tokenizer, cut at the
    encoder's longest input."""
    tokenizer = repo / TOKENIZER_FILE
    return token_feeds(tokenizer, calibration_texts(data_dir, tokenizer), max_tokens)


def build_variants(
    repo: Path,
    fp32_file: str,
    names: Iterable[str],
    data_dir: Path,
    *,
    geometry: Geometry = PACKAGED,
    max_tokens: int = MAX_TOKENS,
) -> dict[str, VariantSpec]:
    """Write the named variants of `repo/fp32_file` into `repo` (int8 calibrated on training
    texts under `data_dir`), unevaluated: `with_recorded_metrics` adds what was recorded
    once every file of the variant is built."""
    variants = {}
    for name in names:
        rel = VARIANT_FILES[name]
        log.info("building the %s encoder variant", name)
        with _quiet_root_logger():
            if name == INT8:
                feeds = calibration_feeds(repo, data_dir, max_tokens)
                recipe = build_int8(repo / fp32_file, repo / rel, feeds)
            else:
                recipe = build_fp16(repo / fp32_file, repo / rel, geometry=geometry)
        variants[name] = VariantSpec(rel, sha256_file(repo / rel), recipe)
    return variants


# The split encoder's trunk holds layer 0, whose feed-forward output stays fp32 in int8
# for the reason given at INT8_FP32_NODES; the branches are quantised whole.
PART_INT8_FP32_NODES = {"trunk": ("/layers/layer.0/output/dense/MatMul",)}


def build_part_variants(
    repo: Path,
    parts: Mapping[str, str],
    names: Sequence[str],
    calibration: Callable[[], Sequence[Feeds]],
    trunk_file: str | None = None,
) -> dict[str, dict[str, PartFile]]:
    """Each named variant of every part (`<part>.<variant>.onnx` beside it), by variant.

    int8 is calibrated on `calibration()`: the trunk's inputs (token ids) for the
    calibration texts, computed only when int8 is asked for. A branch is calibrated on
    what it reads when serving: the fp32 trunk's states for those texts (`trunk_file`,
    by default the trunk among `parts`).
    """
    out: dict[str, dict[str, PartFile]] = {}
    feeds: dict[str, Sequence[Feeds]] = {}
    if INT8 in names:
        tokens = calibration()
        branch = branch_feeds(repo / (trunk_file or parts[TRUNK]), tokens)
        feeds = {part: tokens if part == TRUNK else branch for part in parts}
    for name in names:
        out[name] = {}
        for part, rel in parts.items():
            dst = rel.removesuffix(".onnx") + f".{name}.onnx"
            log.info("building the %s variant of the %s graph", name, part)
            with _quiet_root_logger():
                if name == INT8:
                    fp32_nodes = PART_INT8_FP32_NODES.get(part, ())
                    build_int8(repo / rel, repo / dst, feeds[part], fp32_nodes)
                else:
                    # A branch's attention takes its mask as an input the optimiser's
                    # fusion may not match; unfused fp16 still runs on CUDA.
                    build_fp16(repo / rel, repo / dst, require_attention=False)
            out[name][part] = PartFile(dst, sha256_file(repo / dst))
    return out


def variant_digest(variant: VariantSpec) -> str:
    """What an evaluation is recorded under: the variant's file and, for a split encoder,
    each of its parts, so that a changed part (a retrained multi-task branch, whose heads
    the figures are of) leaves the variant unevaluated."""
    if not variant.parts:
        return variant.sha256
    digest = hashlib.sha256(variant.sha256.encode())
    for name, part in sorted(variant.parts.items()):
        digest.update(f" {name}:{part.sha256}".encode())
    return digest.hexdigest()


def with_recorded_metrics(
    variants: Mapping[str, VariantSpec], record: Path = VARIANT_RECORD
) -> dict[str, VariantSpec]:
    """The variants with the evaluations recorded for exactly their files."""
    return {
        name: dataclasses.replace(v, metrics=recorded_metrics(name, variant_digest(v), record))
        for name, v in variants.items()
    }


def recorded_metrics(name: str, sha256: str, record: Path = VARIANT_RECORD) -> dict[str, float]:
    """The evaluation recorded under exactly this digest (`variant_digest`), or {} (not
    evaluated)."""
    entry = _read(record).get(name)
    if entry is None:
        return {}
    if entry.get("sha256") != sha256:
        log.warning(
            "the %s encoder differs from the one evaluated in %s (new onnxruntime or recipe?); "
            "auto will not pick it until `taskmux model eval --variant %s`",
            name,
            record,
            name,
        )
        return {}
    metrics = entry.get("metrics", {})
    if not isinstance(metrics, dict):
        raise ModelRepoError(f"{record}: the metrics of {name} are not an object")
    return {str(k): float(v) for k, v in metrics.items()}


def record_metrics(name: str, variant: VariantSpec, record: Path = VARIANT_RECORD) -> None:
    """Store `variant`'s metrics under its digest so that later builds carry them."""
    data = _read(record)
    entry = {"sha256": variant_digest(variant), "recipe": variant.recipe}
    data[name] = entry | {"metrics": variant.metrics}
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, record)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantiser and optimiser log a line per node on the root logger, and
    advise a pre-processing step that fails on this export (see `build_int8`)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _read(record: Path) -> dict[str, dict[str, object]]:
    if not record.is_file():
        return {}
    data: dict[str, dict[str, object]] = json.loads(record.read_text(encoding="utf-8"))
    return data
