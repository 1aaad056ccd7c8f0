"""Encoder variants: which file a worker runs, on which providers, and why.

    fp32  `encoder.model_file`, the export itself; runs anywhere.
    int8  int8 weights and activations with scales calibrated at build time (static),
          so a text's vector is the same alone or in any batch; CPU only. Faster on
          CPU, slightly different numbers.
    fp16  attention/layer-norm fusions, then half precision; for CUDA.

`auto` picks fp16 when the CUDA provider is in use, else int8 when it was built and
`taskmux model eval --variant int8` found that no head loses more than
`MAX_HEAD_LOSS_POINTS` (recorded in the variant's metrics), else fp32. An explicit variant
that the repository lacks, or fp16 without CUDA, is refused when the worker starts.

TensorRT is not picked by `auto`: it builds an engine per input shape, and batches here
are padded per batch to any length. Name it first in TASKMUX_PROVIDERS, before CUDA, to
try it; the fused fp16 operators it lacks then run on CUDA.

Imports nothing heavy: workers use this module at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.manifest import FP32 as FP32  # re-exported: workers name variants from here
from model.manifest import EncoderSpec, ModelRepoError, PartFile, load_manifest

AUTO = "auto"
INT8 = "int8"
FP16 = "fp16"
REQUESTS = (AUTO, FP32, INT8, FP16)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA, TENSORRT)  # providers whose presence means "on a GPU"

# The accuracy rule: int8 is the CPU default only if no head's held-out figure (each
# figure with a floor) drops by more than this many percentage points against fp32.
MAX_HEAD_LOSS_POINTS = 1.0

# Keys of VariantSpec.metrics written by the eval and read by `int8_verdict`.
LOSS_PREFIX = "loss_points."  # + "<head>.<metric>": fp32 minus int8, in points
FLOOR_FAILURES = "floor_failures"  # int8 figures below their floor


class VariantError(ModelRepoError):
    """The requested encoder variant cannot run here (missing, or wrong hardware)."""


@dataclass(frozen=True)
class Selection:
    """The variant a worker runs: its file (relative to the repository) and providers."""

    variant: str
    file: str
    providers: list[str]
    reason: str
    # The split encoder's graphs in this variant (part name -> file); empty: run `file`.
    parts: dict[str, str] = field(default_factory=dict)


def int8_verdict(metrics: Mapping[str, float]) -> tuple[bool, str]:
    """Whether int8 may be the CPU default under the accuracy rule, and why (not)."""
    losses = {
        k.removeprefix(LOSS_PREFIX): v for k, v in metrics.items() if k.startswith(LOSS_PREFIX)
    }
    if not losses:
        return False, "int8 has not been evaluated (taskmux model eval --variant int8)"
    if metrics.get(FLOOR_FAILURES, 0.0) > 0:
        return False, f"int8 misses {int(metrics[FLOOR_FAILURES])} held-out floor(s)"
    worst = max(losses, key=lambda k: losses[k])
    if math.isnan(losses[worst]) or losses[worst] > MAX_HEAD_LOSS_POINTS:
        return False, (
            f"int8 loses {losses[worst]:.2f} points on {worst} (more than {MAX_HEAD_LOSS_POINTS:g})"
        )
    return True, f"int8 loses at most {losses[worst]:.2f} points ({worst})"


def select_variant(requested: str, spec: EncoderSpec, providers: Sequence[str]) -> Selection:
    """The variant to run for `requested` given the resolved ONNX Runtime `providers`.

    Raises VariantError for an unknown name, a variant the repository lacks, or fp16
    without a GPU provider.
    """
    if requested not in REQUESTS:
        raise VariantError(f"encoder variant {requested!r} is not one of {REQUESTS}")
    on_gpu = any(p in GPU_PROVIDERS for p in providers)
    if requested == AUTO:
        if on_gpu:
            if FP16 in spec.variants:
                return _selection(spec, FP16, providers, "auto: on a GPU")
            return _selection(spec, FP32, providers, "auto: on a GPU, but fp16 was not built")
        if INT8 not in spec.variants:
            return _selection(spec, FP32, providers, "auto: int8 was not built")
        ok, why = int8_verdict(spec.variants[INT8].metrics)
        if ok:
            return _selection(spec, INT8, [CPU], f"auto: {why}")
        return _selection(spec, FP32, providers, f"auto: {why}")
    if requested == FP16 and not on_gpu:
        raise VariantError(
            f"encoder variant fp16 needs {CUDA} (a GPU), and the providers in use are "
            f"{list(providers)}; use TASKMUX_ENCODER_VARIANT=auto, fp32 or int8 on CPU"
        )
    if requested != FP32 and requested not in spec.variants:
        raise VariantError(
            f"encoder variant {requested} is not in the model repository (it has "
            f"{[FP32, *sorted(spec.variants)]}); rebuild it with `taskmux model build --force`"
        )
    # int8's kernels (MatMulIntegerToFloat) are CPU kernels; on CUDA they would bounce
    # tensors between devices at every layer.
    chosen = [CPU] if requested == INT8 else list(providers)
    return _selection(spec, requested, chosen, "requested")


def _selection(spec: EncoderSpec, variant: str, providers: Sequence[str], why: str) -> Selection:
    file = spec.model_file if variant == FP32 else spec.variants[variant].file
    parts = {name: part.file for name, part in variant_parts(spec, variant).items()}
    return Selection(variant, file, list(providers), why, parts)


def variant_parts(spec: EncoderSpec, variant: str) -> dict[str, PartFile]:
    """The split encoder's graphs in `variant` (part name -> file); empty: one graph."""
    return dict(spec.parts if variant == FP32 else spec.variants[variant].parts)


def variant_paths(repo: Path) -> dict[str, Path]:
    """Every encoder file of a repository by variant name (fp32 first), checksums verified."""
    spec = load_manifest(repo).encoder
    paths = {FP32: repo / spec.model_file}
    paths.update({name: repo / v.file for name, v in sorted(spec.variants.items())})
    return paths
