import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmdeploy.errors import ArtifactError, ConfigError
from mmdeploy.exporters.lint import Finding, check_for_target, lint_onnx

OPSET = [helper.make_opsetid("", 18)]


def _value(name, shape=("batch", 8), dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _model(nodes, inputs, outputs, initializers=(), functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = OPSET + [helper.make_opsetid("local", 1)] if functions else OPSET
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 9
    return model


def _k_initializer(value=3):
    return numpy_helper.from_array(np.array([value], dtype=np.int64), "k")


def test_clean_graph_has_no_findings():
    w = numpy_helper.from_array(np.ones((8, 4), dtype=np.float32), "w")
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])],
        [_value("x")],
        [_value("y", ("batch", 4))],
        [w],
    )
    onnx.checker.check_model(model, full_check=True)
    assert lint_onnx(model) == []
    assert check_for_target([], "tensorrt") == []


def test_nonzero_is_flagged():
    model = _model(
        [helper.make_node("NonZero", ["x"], ["idx"], name="nz")],
        [_value("x")],
        [_value("idx", (2, "n"), TensorProto.INT64)],
    )
    assert lint_onnx(model) == [Finding("NonZero", "nz", "data-dependent output shape")]


def test_topk_constant_k_passes_and_dynamic_k_is_flagged():
    outputs = [_value("v", ("batch", 3)), _value("i", ("batch", 3), TensorProto.INT64)]
    from_initializer = _model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
        [_value("x")],
        outputs,
        [_k_initializer()],
    )
    from_constant = _model(
        [
            helper.make_node("Constant", [], ["k"], value=_k_initializer()),
            helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk"),
        ],
        [_value("x")],
        outputs,
    )
    from_input = _model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
        [_value("x"), _value("k", (1,), TensorProto.INT64)],
        outputs,
    )
    # an initializer that is also a graph input can be overridden when the model runs
    overridable = _model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
        [_value("x"), _value("k", (1,), TensorProto.INT64)],
        outputs,
        [_k_initializer()],
    )
    assert lint_onnx(from_initializer) == [] and lint_onnx(from_constant) == []
    for model in (from_input, overridable):
        (finding,) = lint_onnx(model)
        assert (finding.op_type, finding.node_name) == ("TopK", "topk")
        assert "'k'" in finding.reason


@pytest.mark.parametrize("reduction, flagged", [(None, False), ("none", False), ("add", True)])
def test_scatter_reduction(reduction, flagged):
    attrs = {} if reduction is None else {"reduction": reduction}
    node = helper.make_node("ScatterElements", ["x", "idx", "upd"], ["y"], name="sc", **attrs)
    model = _model(
        [node],
        [_value("x"), _value("idx", ("batch", 8), TensorProto.INT64), _value("upd")],
        [_value("y")],
    )
    findings = lint_onnx(model)
    assert findings == (
        [Finding("ScatterElements", "sc", "scatter with reduction='add'")] * flagged
    )


def test_if_subgraph_is_walked():
    def branch(name, op):
        node = helper.make_node(op, ["x"], [f"{name}_out"], name=f"{name}_node")
        return helper.make_graph([node], name, [], [_value(f"{name}_out", (2, "n"))])

    cond = helper.make_node("ReduceMax", ["x"], ["c"], keepdims=0)
    cast = helper.make_node("Cast", ["c"], ["cb"], to=TensorProto.BOOL)
    if_node = helper.make_node(
        "If",
        ["cb"],
        ["y"],
        name="if0",
        then_branch=branch("then", "NonZero"),
        else_branch=branch("else", "Shape"),
    )
    model = _model([cond, cast, if_node], [_value("x")], [_value("y", (2, "n"))])
    findings = lint_onnx(model)
    assert Finding("If", "if0", "control flow") in findings
    assert (
        Finding("NonZero", "if0/then_branch/then_node", "data-dependent output shape") in findings
    )
    assert len(findings) == 2


def test_function_body_is_walked():
    body_graph = helper.make_graph(
        [helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [_value("i", (), TensorProto.INT64), _value("cond", (), TensorProto.BOOL), _value("v_in")],
        [_value("cond", (), TensorProto.BOOL), _value("v_out")],
    )
    loop = helper.make_node("Loop", ["n", "", "a"], ["b"], name="loop0", body=body_graph)
    function = helper.make_function(
        "local", "Repeat", ["a", "n"], ["b"], [loop], opset_imports=OPSET
    )
    n = numpy_helper.from_array(np.array(3, dtype=np.int64), "n")
    model = _model(
        [helper.make_node("Repeat", ["x", "n"], ["y"], domain="local", name="call")],
        [_value("x")],
        [_value("y")],
        [n],
        functions=[function],
    )
    assert lint_onnx(model) == [Finding("Loop", "function local.Repeat/loop0", "control flow")]


def test_topk_in_function_with_k_from_its_inputs_is_flagged():
    topk = helper.make_node("TopK", ["a", "k"], ["v", "i"], name="topk")
    function = helper.make_function(
        "local", "Top", ["a", "k"], ["v", "i"], [topk], opset_imports=OPSET
    )
    model = _model(
        [helper.make_node("Top", ["x", "k"], ["v", "i"], domain="local")],
        [_value("x")],
        [_value("v", ("batch", 3)), _value("i", ("batch", 3), TensorProto.INT64)],
        [_k_initializer()],
        functions=[function],
    )
    assert [(f.op_type, f.node_name) for f in lint_onnx(model)] == [
        ("TopK", "function local.Top/topk")
    ]


def test_lint_reads_paths_without_external_data(tmp_path):
    model = _model(
        [helper.make_node("Unique", ["x"], ["u"], name="uniq")],
        [_value("x", (8,))],
        [_value("u", ("n",))],
    )
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    assert (
        lint_onnx(path)
        == lint_onnx(str(path))
        == [Finding("Unique", "uniq", "data-dependent output shape")]
    )
    with pytest.raises(ArtifactError, match="missing"):
        lint_onnx(tmp_path / "absent.onnx")


def test_check_for_target():
    findings = [
        Finding("NonZero", "a", "data-dependent output shape"),
        Finding("NonZero", "b", "data-dependent output shape"),
        Finding("If", "c", "control flow"),
    ]
    assert check_for_target(findings, "onnxruntime") == findings
    with pytest.raises(ConfigError) as info:
        check_for_target(findings, "tensorrt")
    message = str(info.value)
    assert "1 If, 2 NonZero (first: NonZero 'a': data-dependent output shape)" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="unknown lint target"):
        check_for_target(findings, "coreml")
