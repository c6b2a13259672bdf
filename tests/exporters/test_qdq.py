"""TensorRT INT8's TensorRT-free parts: the INT8 precision plan, the symmetric QDQ graph
written for TensorRT's explicit quantization, and the check that refuses any other graph
before TensorRT's parser sees it."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from mmdeploy.errors import ArtifactError, BackendUnavailableError, ConfigError
from mmdeploy.exporters.precision import (
    QDQ_LAYER_TYPES,
    fp32_nodes,
    int8_plan,
    layers_to_pin,
)
from mmdeploy.exporters.qdq import (
    QDQ_FILE,
    check_symmetric,
    refuse_unless_symmetric,
    write_tensorrt_qdq,
)
from mmdeploy.exporters.tensorrt import build_engine, build_int8_engine
from mmdeploy.runtime.tensorrt import PRECISIONS, Profile, engine_file, unavailable_reason

PROFILE = Profile.for_batches(1, 4, 16, (32, 32))


class RandomPixels(CalibrationDataReader):
    """Two batches of seeded random pixels: ranges for a test, not for a real model."""

    def __init__(self, batches: int = 2):
        rng = np.random.default_rng(0)
        self.batches = iter([rng.standard_normal((8, 3, 32, 32), dtype=np.float32)
                             for _ in range(batches)])
        self.read = 0

    def get_next(self):
        batch = next(self.batches, None)
        self.read += batch is not None
        return None if batch is None else {"pixel_values": batch}


@pytest.fixture(scope="module")
def fp32_path(tiny_run) -> Path:
    return tiny_run / "export" / "model.onnx"


@pytest.fixture(scope="module")
def graph(fp32_path) -> onnx.ModelProto:
    return onnx.load(str(fp32_path), load_external_data=False)


@pytest.fixture(scope="module")
def qdq(fp32_path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("qdq") / QDQ_FILE
    return out, write_tensorrt_qdq(fp32_path, out, RandomPixels())


# ---------------------------------------------------------------------------- the INT8 plan


def test_int8_plan_of_the_tiny_graph(graph):
    plan = int8_plan(graph)
    nodes = {n.name: n for n in graph.graph.node}
    # every node has exactly one precision; the FP32 ones are the FP16 plan's
    assert plan.fp32 == fp32_nodes(graph)
    assert sorted([*plan.int8, *plan.fp32, *plan.fp16]) == sorted(nodes)
    assert {nodes[n].op_type for n in plan.int8} == {"MatMul", "Gemm", "Conv"}
    assert all(plan.precision(n) == "int8" for n in plan.int8)
    # the routers' scores stay FP32, attention products and the cosine head in FP16
    reasons = set(plan.not_quantized.values())
    assert reasons == {"router/kNN scores", "cosine head",
                       "no constant weight (a product of two activations)"}
    for name, why in plan.not_quantized.items():
        assert plan.precision(name) == ("fp32" if why == "router/kNN scores" else "fp16")
    heads = [n for n, why in plan.not_quantized.items() if why == "cosine head"]
    assert len(heads) == 1 and nodes[heads[0]].op_type == "MatMul"
    # the bulk of the work is INT8: the patch embedding and every weight matmul
    weighted = [n for n in nodes.values() if n.op_type in ("MatMul", "Gemm", "Conv")
                and n.input[1] in {i.name for i in graph.graph.initializer}]
    assert len(plan.int8) >= len(weighted) - len(plan.not_quantized)


def test_int8_plan_on_a_hand_made_graph():
    """A weight matmul (INT8), a router (x @ Wr -> TopK, FP32), an attention product of two
    activations (FP16) and a cosine head (normalised x @ classes -> * scale -> logits)."""
    h = helper
    init = [numpy_helper.from_array(np.ones((4, 4), np.float32), n) for n in ("w", "wr", "cls")]
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["y"], name="expert_mm"),
        h.make_node("MatMul", ["x", "wr"], ["scores"], name="router_mm"),
        h.make_node("TopK", ["scores", "k"], ["values", "indices"], name="router_topk"),
        h.make_node("MatMul", ["y", "x_t"], ["attn"], name="attention"),
        h.make_node("ReduceL2", ["attn"], ["norm"], keepdims=1, name="l2"),
        h.make_node("Div", ["attn", "norm"], ["unit"], name="normalise"),
        h.make_node("MatMul", ["unit", "cls"], ["cos"], name="head"),
        h.make_node("Mul", ["cos", "scale"], ["logits"], name="logit_scale"),
    ]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                         [h.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4])], init)
    plan = int8_plan(h.make_model(graph))
    assert plan.int8 == ["expert_mm"]
    assert plan.not_quantized == {
        "router_mm": "router/kNN scores", "head": "cosine head",
        "attention": "no constant weight (a product of two activations)"}
    assert set(plan.fp32) == {"router_mm", "router_topk", "l2", "normalise"}
    assert plan.fp16 == ["attention", "head", "logit_scale"]


def test_qdq_layers_are_never_pinned():
    plan = {"node_MatMul_3": "router/kNN scores"}
    layers = [("node_MatMul_3", "MATRIX_MULTIPLY"), ("x_QuantizeLinear", "QUANTIZE"),
              ("node_MatMul_3_1", "DEQUANTIZE"), ("fused_softmax", "SOFTMAX")]
    assert layers_to_pin(layers, plan, ["node_MatMul_3"]) == {"node_MatMul_3", "fused_softmax"}
    assert {"QUANTIZE", "DEQUANTIZE"} == QDQ_LAYER_TYPES


# ---------------------------------------------------------------------------- the QDQ graph


def test_qdq_graph_is_symmetric_int8_on_the_planned_nodes(graph, qdq):
    path, facts = qdq
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert check_symmetric(model) == []
    refuse_unless_symmetric(path)  # no exception
    plan = int8_plan(graph)
    assert facts["file"] == QDQ_FILE and facts["quantized_nodes"] == plan.int8
    assert facts["not_quantized"] == plan.not_quantized and len(facts["sha256"]) == 64
    init = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and all(init[n.input[2]].data_type == TensorProto.INT8 for n in q_nodes)
    assert all(not numpy_helper.to_array(init[n.input[2]]).any() for n in q_nodes)
    for node in model.graph.node:
        feeds = [producer.get(i) for i in node.input[:2]]
        dequantized = [f is not None and f.op_type == "DequantizeLinear" for f in feeds]
        if node.name in plan.int8:  # both inputs through Q/DQ: TensorRT runs it in INT8
            assert all(dequantized), node.name
        elif node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            assert not any(dequantized), node.name  # routers read the float tensor
    # weights per output channel (conv: axis 0; [K, N] matmul: axis 1; Gemm by transB; a
    # batched [1, K, N] weight per tensor), kept FP32 for TensorRT to quantize at build time
    nodes = {n.name: n for n in model.graph.node}
    for name in plan.int8:
        node = nodes[name]
        quantize = producer[producer[node.input[1]].input[0]]
        weight = init[quantize.input[0]]
        axis = next((a.i for a in quantize.attribute if a.name == "axis"), None)
        scale = numpy_helper.to_array(init[quantize.input[1]])
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        expected = {"Conv": 0, "Gemm": 0 if trans_b else 1, "MatMul": 1}[node.op_type]
        assert weight.data_type == TensorProto.FLOAT, name
        if len(weight.dims) == 3:
            assert scale.size == 1, name
        else:
            assert axis == expected and scale.shape == (weight.dims[expected],), name
    # activations per tensor
    activations = [n for n in q_nodes if n.input[0] not in init]
    assert activations and all(init[n.input[1]].dims in ([], [1]) for n in activations)
    # the FP16 plan's pins are the same on the QDQ graph (TensorRT reads that one)
    assert fp32_nodes(model) == fp32_nodes(graph)


def test_qdq_graph_keeps_the_answers(fp32_path, qdq):
    """ONNX Runtime with graph optimizations off runs the Q/DQ pairs as written: a preview
    of TensorRT's INT8 rounding (its FP16 fallback adds its own)."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp32 = onnxruntime.InferenceSession(str(fp32_path))
    int8 = onnxruntime.InferenceSession(str(qdq[0]), options)
    pixels = np.random.default_rng(7).standard_normal((16, 3, 32, 32), dtype=np.float32)
    (logits, embeddings), (q_logits, q_embeddings) = (
        s.run(["logits", "embeddings"], {"pixel_values": pixels}) for s in (fp32, int8))
    cosine = (embeddings * q_embeddings).sum(1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(q_embeddings, axis=1))
    assert cosine.min() > 0.99
    assert 0 < np.abs(logits - q_logits).max() < 1.0


def test_excluded_nodes_stay_float(fp32_path, graph, tmp_path):
    first, second = int8_plan(graph).int8[:2]
    facts = write_tensorrt_qdq(fp32_path, tmp_path / QDQ_FILE, RandomPixels(1), [first])
    assert first not in facts["quantized_nodes"] and second in facts["quantized_nodes"]
    assert facts["not_quantized"][first] == "excluded"
    assert check_symmetric(onnx.load(str(tmp_path / QDQ_FILE))) == []


# ---------------------------------------------------------------------------- refusals


def _first_node(model: onnx.ModelProto, op_types: tuple[str, ...]) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type in op_types)


def test_asymmetric_uint8_qdq_graph_is_refused_naming_the_first_node(fp32_path, tmp_path):
    path = tmp_path / "u8.onnx"
    quantize_static(str(fp32_path), str(path), RandomPixels(1), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul"])
    model = onnx.load(str(path))
    problems = check_symmetric(model)
    first = _first_node(model, ("QuantizeLinear",))
    assert problems[0].startswith(f"node {first.name!r} (QuantizeLinear): quantizes to UINT8")
    assert any("is not 0 (asymmetric)" in p for p in problems)
    with pytest.raises(ArtifactError) as info:
        refuse_unless_symmetric(path)
    message = str(info.value)
    assert "\n" not in message and first.name in message and "more)" in message
    # the TensorRT exporter refuses it before anything else (even here, without TensorRT)
    with pytest.raises(ArtifactError, match="symmetric INT8 Q/DQ only"):
        build_engine(path, tmp_path, PROFILE, "int8")


def test_dynamic_int8_graph_is_refused_naming_the_first_node(fp32_path, tmp_path):
    path = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(fp32_path), str(path), op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)
    model = onnx.load(str(path))
    first = _first_node(model, ("DynamicQuantizeLinear", "MatMulInteger"))
    problems = check_symmetric(model)
    assert problems[0] == (f"node {first.name!r} ({first.op_type}): ONNX Runtime's integer "
                           "operator, not Q/DQ")
    assert any("(MatMulInteger)" in p for p in problems)
    with pytest.raises(ArtifactError, match=first.name):
        refuse_unless_symmetric(path)


def _qdq_model(*nodes, initializers=()):
    h = helper
    graph = h.make_graph(list(nodes), "g",
                         [h.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                         [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                          *initializers])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


@pytest.mark.parametrize("zero_point, problem", [
    (None, "quantizes to UINT8, not INT8"),  # no zero point: QuantizeLinear makes UINT8
    (np.array(3, np.int8), "zero point [3] is not 0 (asymmetric)"),
    (np.array(0, np.uint8), "quantizes to UINT8, not INT8"),
])
def test_hand_made_quantize_nodes(zero_point, problem):
    h = helper
    inputs = ["x", "s"] + (["zp"] if zero_point is not None else [])
    extra = [numpy_helper.from_array(zero_point, "zp")] if zero_point is not None else []
    model = _qdq_model(h.make_node("QuantizeLinear", inputs, ["q"], name="q"),
                       h.make_node("DequantizeLinear", ["q", "s"] + inputs[2:], ["y"],
                                   name="dq"), initializers=extra)
    problems = check_symmetric(model)
    assert problems[0] == f"node 'q' (QuantizeLinear): {problem}"


def test_symmetric_int8_pair_and_other_refusals():
    h = helper
    zero = numpy_helper.from_array(np.array(0, np.int8), "zp")
    good = _qdq_model(h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
                      h.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
                      initializers=[zero])
    assert check_symmetric(good) == []
    bias = numpy_helper.from_array(np.array([5, 7], np.int32), "bias")  # an INT32 bias
    assert check_symmetric(_qdq_model(
        h.make_node("DequantizeLinear", ["bias", "s"], ["y"], name="dq_bias"),
        initializers=[bias])) == ["node 'dq_bias' (DequantizeLinear): quantizes to INT32, "
                                  "not INT8"]
    contrib = _qdq_model(h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q",
                                     domain="com.microsoft"),
                         h.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq"),
                         initializers=[zero])
    assert check_symmetric(contrib)[0] == ("node 'q' (QuantizeLinear): in domain "
                                           "'com.microsoft', not ONNX's")


# ---------------------------------------------------------------------------- the build


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT is here: see the GPU test")
def test_int8_build_without_tensorrt_refuses_before_calibrating(fp32_path, tmp_path):
    reader = RandomPixels()
    with pytest.raises(BackendUnavailableError):
        build_int8_engine(fp32_path, tmp_path, PROFILE, reader, log=lambda _: None)
    assert reader.read == 0 and not (tmp_path / QDQ_FILE).exists()


def test_int8_is_a_tensorrt_precision_with_its_own_engine_file(fp32_path, tmp_path):
    assert "int8" in PRECISIONS
    assert engine_file("NVIDIA H100 80GB HBM3", "int8") == "model.nvidia-h100-80gb-hbm3.int8.engine"
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        build_engine(fp32_path, tmp_path, PROFILE, "int4")
