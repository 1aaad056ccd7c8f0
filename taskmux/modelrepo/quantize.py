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
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model.manifest import ModelRepoError, PartFile, VariantSpec, sha256_file
from model.variants import FP16, INT8

log = logging.getLogger(__name__)

VARIANT_RECORD = Path(__file__).parent / "trained" / "encoder" / "variants.json"
VARIANT_FILES = {INT8: "encoder/model.int8.onnx", FP16: "encoder/model.fp16.onnx"}

# MatMuls kept in fp32 in the int8 model. The activation scale of a dynamically quantised
# MatMul is one number for the whole batch; the first layer's feed-forward output reads
# post-GELU activations whose outliers make that scale coarse. Keeping this one MatMul in
# fp32 took the worst cosine to fp32 over 400 held-out texts from 0.979 to 0.986 and the
# entities F1 loss from 1.2 to 0.8 points, for about 5% of the int8 speed-up. Keeping all
# six feed-forward outputs (0.991, 0.3 points) cost a third of the speed-up.
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


def build_int8(src: Path, dst: Path, keep_fp32: Sequence[str] = INT8_FP32_NODES) -> str:
    """Quantise `src` to `dst` (int8 weights per output channel); returns the recipe."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = {node.name for node in onnx.load(str(src), load_external_data=False).graph.node}
    missing = set(keep_fp32) - names
    if missing:  # an export with other node names would silently quantise them
        raise RuntimeError(f"int8 recipe names nodes the export lacks: {sorted(missing)}")
    # Per-channel weights: per-tensor scales lose too much (cosine to fp32 0.96 vs 0.99).
    # Only MatMul: the embedding tables (Gather) stay fp32, as they cost memory, not time.
    # No quant_pre_process: its symbolic shape inference fails on this export, and ORT
    # applies the same graph optimisations when the session loads.
    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        nodes_to_exclude=list(keep_fp32),
    )
    return (
        f"onnxruntime {onnxruntime.__version__} quantize_dynamic: QInt8 weights per channel, "
        f"MatMul only, fp32 kept for {', '.join(keep_fp32) or 'none'}"
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


def build_variants(
    repo: Path,
    fp32_file: str,
    names: Iterable[str],
    *,
    geometry: Geometry = PACKAGED,
    record: Path | None = VARIANT_RECORD,
) -> dict[str, VariantSpec]:
    """Write the named variants of `repo/fp32_file` into `repo`, with the metrics `record`
    holds for them (None: another encoder than the one recorded, so none)."""
    variants = {}
    for name in names:
        rel = VARIANT_FILES[name]
        log.info("building the %s encoder variant", name)
        with _quiet_root_logger():
            if name == INT8:
                recipe = build_int8(repo / fp32_file, repo / rel)
            else:
                recipe = build_fp16(repo / fp32_file, repo / rel, geometry=geometry)
        sha = sha256_file(repo / rel)
        metrics = {} if record is None else recorded_metrics(name, sha, record)
        variants[name] = VariantSpec(rel, sha, recipe, metrics)
    return variants


# The split encoder's trunk holds layer 0, whose feed-forward output stays fp32 in int8
# for the reason given at INT8_FP32_NODES; the branches are quantised whole.
PART_INT8_FP32_NODES = {"trunk": ("/layers/layer.0/output/dense/MatMul",)}


def build_part_variants(
    repo: Path, parts: Mapping[str, str], names: Iterable[str]
) -> dict[str, dict[str, PartFile]]:
    """Each named variant of every part (`encoder/<part>.<variant>.onnx`), by variant."""
    out: dict[str, dict[str, PartFile]] = {}
    for name in names:
        out[name] = {}
        for part, rel in parts.items():
            dst = rel.removesuffix(".onnx") + f".{name}.onnx"
            log.info("building the %s variant of the %s graph", name, part)
            with _quiet_root_logger():
                if name == INT8:
                    build_int8(repo / rel, repo / dst, PART_INT8_FP32_NODES.get(part, ()))
                else:
                    # A branch's attention takes its mask as an input the optimiser's
                    # fusion may not match; unfused fp16 still runs on CUDA.
                    build_fp16(repo / rel, repo / dst, require_attention=False)
            out[name][part] = PartFile(dst, sha256_file(repo / dst))
    return out


def recorded_metrics(name: str, sha256: str, record: Path = VARIANT_RECORD) -> dict[str, float]:
    """The evaluation recorded for exactly this variant file, or {} (not evaluated)."""
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
    """Store `variant`'s metrics under its SHA-256 so that later builds carry them."""
    data = _read(record)
    data[name] = {"sha256": variant.sha256, "recipe": variant.recipe, "metrics": variant.metrics}
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
