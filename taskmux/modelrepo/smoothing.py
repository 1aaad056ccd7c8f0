"""SmoothQuant (Xiao et al. 2023) on chosen MatMuls of an fp32 graph, before static int8.

A few hidden channels of this encoder carry activations tens of times larger than the rest
(the feed-forward input after the attention LayerNorm reaches about 35 where most values
stay within 1), and one static per-tensor uint8 scale over such a tensor leaves the other
channels a handful of levels. Smoothing divides each input channel j by
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and multiplies row j of the weight by s_j:
the product is unchanged in exact arithmetic, and the range moves from the activation,
quantised per tensor, into the weight, quantised per output channel. The division is a Mul
node before the MatMul (the input also feeds a residual Add, so the LayerNorm above cannot
absorb it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model.parts import Feeds

ALPHA = 0.5  # the paper's default: the range split evenly between activation and weight
_FLOOR = 1e-5  # channels that are all zero keep a finite scale

Floats = npt.NDArray[np.float32]


def smooth_matmuls(
    src: Path, dst: Path, feeds: Sequence[Feeds], patterns: Sequence[str], alpha: float = ALPHA
) -> list[str]:
    """Write `src` to `dst` with every constant-weight MatMul whose name contains one of
    `patterns` smoothed on `feeds`' activations; returns the smoothed node names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    weights = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[Any]] = {}  # input tensor -> the MatMuls reading it (q, k, v)
    for node in model.graph.node:
        wanted = any(p in node.name for p in patterns)
        if wanted and node.op_type == "MatMul" and node.input[1] in weights:
            groups.setdefault(node.input[0], []).append(node)
    peaks = _channel_peaks(src, list(groups), feeds) if groups else {}
    for k, (tensor, nodes) in enumerate(groups.items()):
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        weight_peak = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)
        scale = _scale(peaks[tensor], weight_peak, alpha)
        for node, w in zip(nodes, arrays, strict=True):
            smoothed = (w * scale[:, None]).astype(np.float32)
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(smoothed, node.input[1]))
        inverse, divided = f"smooth_{k}_inverse_scale", f"{tensor}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array(1 / scale, inverse))
        mul = onnx.helper.make_node("Mul", [tensor, inverse], [divided], name=f"smooth_{k}_Mul")
        model.graph.node.insert(list(model.graph.node).index(nodes[0]), mul)
        for node in nodes:
            node.input[0] = divided
    onnx.save(model, str(dst))
    return [n.name for nodes in groups.values() for n in nodes]


def _scale(activation_peak: Floats, weight_peak: Floats, alpha: float) -> Floats:
    a = np.maximum(activation_peak, _FLOOR) ** alpha
    w = np.maximum(weight_peak, _FLOOR) ** (1 - alpha)
    return (a / w).astype(np.float32)


def _channel_peaks(src: Path, tensors: list[str], feeds: Sequence[Feeds]) -> dict[str, Floats]:
    """max |x| per last-axis channel of each tensor, over every token of every feed."""
    import onnx
    import onnxruntime as ort

    probe = onnx.load(str(src))
    for name in tensors:
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    peaks: dict[str, Floats] = {}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return peaks
