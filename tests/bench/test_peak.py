"""The machine's matmul peak and a graph's FLOP count (`mmdeploy.bench.peak`): the peak is a
positive finite number (never a speed bound), the count is exact on a graph built by hand."""

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mmdeploy.bench.peak import Peak, count_flops, matmul_graph, measure_peak


def test_peak_is_positive_and_finite():
    peak = measure_peak(size=128, iters=2, threads=1)
    assert peak.provider == "CPUExecutionProvider" and peak.device == "cpu"
    assert (peak.size, peak.iters) == (128, 2)
    for value in (peak.fp32_gflops, peak.int8_gops):
        assert isinstance(value, float) and math.isfinite(value) and value > 0
    assert peak.for_precision("fp32") == peak.fp32_gflops
    assert peak.for_precision("int8") == peak.int8_gops
    assert peak.for_precision("fp16") is None


def test_peak_graphs_are_one_matmul_with_a_constant_weight():
    for int8, op in ((False, "MatMul"), (True, "MatMulInteger")):
        model = matmul_graph(16, int8)
        onnx.checker.check_model(model, full_check=True)
        assert [n.op_type for n in model.graph.node] == [op]
        assert [i.name for i in model.graph.initializer] == ["b"]


def test_peak_without_an_int8_kernel_has_no_share():
    peak = Peak("CUDAExecutionProvider", "cuda", 2048, 5, 50_000.0, None)
    assert peak.for_precision("int8") is None


def _hand_made_graph(path):
    """A stride-4 Conv, a MatMul after a Reshape whose shape is computed from the batch
    (shape inference needs data propagation), a product of two activations, a Gemm with
    transA, and ops that are not counted (Softmax, Transpose)."""
    h = helper
    init = [
        numpy_helper.from_array(np.zeros((5, 3, 4, 4), np.float32), "conv_w"),
        numpy_helper.from_array(np.zeros((5, 7), np.float32), "w1"),
        numpy_helper.from_array(np.zeros((9, 6), np.float32), "w2"),
        numpy_helper.from_array(np.array([5, -1], np.int64), "tail"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "conv_w"], ["c"], strides=[4, 4], name="conv"),  # [B,5,2,2]
        h.make_node("Shape", ["c"], ["c_shape"], name="shape"),
        h.make_node("Gather", ["c_shape", "zero"], ["batch"], axis=0, name="batch"),
        h.make_node("Concat", ["batch", "tail"], ["target"], axis=0, name="target"),
        h.make_node("Reshape", ["c", "target"], ["tokens"], name="reshape"),  # [B,5,4]
        h.make_node("Transpose", ["tokens"], ["t"], perm=[0, 2, 1], name="transpose"),
        h.make_node("MatMul", ["t", "w1"], ["m"], name="linear"),  # [B,4,5] @ [5,7]
        h.make_node("Softmax", ["m"], ["p"], axis=-1, name="softmax"),
        h.make_node("Transpose", ["m"], ["m_t"], perm=[0, 2, 1], name="transpose_m"),
        h.make_node("MatMul", ["p", "m_t"], ["s"], name="scores"),  # [B,4,7] @ [B,7,4]
        h.make_node("Gemm", ["g_in", "w2"], ["y"], transA=1, name="gemm"),  # [9,3]^T @ [9,6]
    ]
    graph = h.make_graph(
        nodes, "hand",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
         h.make_tensor_value_info("g_in", TensorProto.FLOAT, [9, 3])],
        [h.make_tensor_value_info("s", TensorProto.FLOAT, None),
         h.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(path))


def test_flop_count_is_exact_on_a_known_graph(tmp_path):
    path = tmp_path / "hand.onnx"
    _hand_made_graph(path)
    count = count_flops(path)
    conv = 2 * (5 * 2 * 2) * (3 * 4 * 4)    # output elements x C_in x kernel
    linear = 2 * (4 * 7) * 5                # [1,4,5] @ [5,7]
    scores = 2 * (4 * 4) * 7                # [1,4,7] @ [1,7,4]
    gemm = 2 * (3 * 6) * 9                  # transA: [9,3]^T @ [9,6]
    assert count.unresolved == []
    assert count.by_op == {"Conv": conv, "MatMul": linear + scores, "Gemm": gemm}
    assert count.total == conv + linear + scores + gemm


def test_flop_count_of_the_tiny_export(tiny_run):
    """The tiny CLIP: its patch embedding (16 patches of 8x8x3 -> 64 channels) and the
    matmuls, every shape resolved through the dynamic batch axis."""
    count = count_flops(tiny_run / "export" / "model.onnx")
    assert count.unresolved == []
    assert count.by_op["Conv"] == 2 * (64 * 4 * 4) * (3 * 8 * 8)
    assert count.by_op["MatMul"] > count.by_op["Conv"] and count.total == sum(
        count.by_op.values())
