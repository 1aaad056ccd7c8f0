"""SmoothQuant moves a MatMul's input range into its weight without changing its output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from taskmux.modelrepo.smoothing import smooth_matmuls

WIDTH, OUT = 8, 5


def two_matmuls(path: Path, rng: np.random.Generator) -> None:
    """x -> (x @ A, x @ B): two MatMuls sharing one input, as query, key and value do."""
    weights = [
        numpy_helper.from_array(rng.normal(size=(WIDTH, OUT)).astype(np.float32), name)
        for name in ("A", "B")
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["a"], name="/q/MatMul"),
        helper.make_node("MatMul", ["x", "B"], ["b"], name="/k/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", OUT]) for n in "ab"],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(["a", "b"], {"x": x}))


def test_smoothing_keeps_outputs_and_flattens_the_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    two_matmuls(src, rng)
    x = rng.normal(size=(16, WIDTH)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel, as after this encoder's LayerNorms
    smoothed = smooth_matmuls(src, dst, [{"x": x}], ["/q/", "/k/"])
    assert sorted(smoothed) == ["/k/MatMul", "/q/MatMul"]
    for before, after in zip(run(src, x), run(dst, x), strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    model = onnx.load(str(dst))
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    assert len(muls) == 1  # one division serves both MatMuls
    inverse = numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == muls[0].input[1])
    )
    peaks = np.abs(x * inverse).max(axis=0)
    assert peaks.max() / peaks.min() < np.abs(x).max(axis=0).max() / np.abs(x).max(axis=0).min()


def test_unmatched_patterns_leave_the_graph_alone(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    two_matmuls(src, np.random.default_rng(1))
    x = np.ones((2, WIDTH), dtype=np.float32)
    assert smooth_matmuls(src, dst, [{"x": x}], ["/v/"]) == []
    assert not [n for n in onnx.load(str(dst)).graph.node if n.op_type == "Mul"]
