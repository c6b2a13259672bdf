"""The TensorRT path's parts that need neither TensorRT nor a GPU: the optimization profile
and its input check, the engine sidecar and its compatibility check, the FP16 precision plan."""

import json

import onnx
import pytest

from mmdeploy.errors import ArtifactError, EngineIncompatibleError, InputError
from mmdeploy.exporters.precision import PINNED_LAYER_TYPES, fp32_nodes, layers_to_pin
from mmdeploy.runtime.tensorrt import (
    EngineSidecar,
    Profile,
    RuntimeInfo,
    engine_file,
    gpu_slug,
)

PROFILE = Profile.for_batches(1, 8, 32, (32, 32))
BUILT = RuntimeInfo("10.13.3.9", "NVIDIA H100 80GB HBM3", "9.0")


def test_profile_from_batch_range():
    expected = Profile("pixel_values", (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    assert expected == PROFILE
    assert Profile.from_dict(json.loads(json.dumps(PROFILE.to_dict()))) == PROFILE
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        Profile.for_batches(8, 4, 32, (32, 32))


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (7, 3, 32, 32), (32, 3, 32, 32)])
def test_profile_accepts_shapes_inside(shape):
    PROFILE.check("pixel_values", shape)


@pytest.mark.parametrize("name, shape", [
    ("pixel_values", (33, 3, 32, 32)),   # batch above the profile
    ("pixel_values", (0, 3, 32, 32)),    # below
    ("pixel_values", (4, 3, 64, 64)),    # another image size
    ("pixel_values", (4, 3, 32)),        # another rank
    ("images", (4, 3, 32, 32)),          # not the profile's input
])
def test_profile_refuses_shapes_outside_naming_input_and_range(name, shape):
    with pytest.raises(InputError) as info:
        PROFILE.check(name, shape)
    message = str(info.value)
    assert f"input {name!r} has shape {list(shape)}" in message
    assert "takes 'pixel_values' from [1, 3, 32, 32] to [32, 3, 32, 32]" in message


def _sidecar(**changes) -> EngineSidecar:
    fields = dict(tensorrt_version=BUILT.tensorrt_version, gpu_name=BUILT.gpu_name,
                  compute_capability=BUILT.compute_capability, profile=PROFILE,
                  precision="fp16", onnx_sha256="ab" * 32, fp32_layers=41)
    return EngineSidecar(**{**fields, **changes})


def test_sidecar_round_trip(tmp_path):
    path = tmp_path / f"{engine_file(BUILT.gpu_name, 'fp16')}.json"
    _sidecar().save(path)
    data = json.loads(path.read_text())
    assert data["profile"]["max"] == [32, 3, 32, 32] and data["precision"] == "fp16"
    assert EngineSidecar.load(path) == _sidecar()


def test_sidecar_that_is_not_one_is_an_artifact_error(tmp_path):
    path = tmp_path / "model.engine.json"
    path.write_text(json.dumps({"tensorrt_version": "10.0"}))
    with pytest.raises(ArtifactError, match="not an engine sidecar"):
        EngineSidecar.load(path)


def test_compatible_runtime_passes():
    _sidecar().check_compatible(BUILT)


@pytest.mark.parametrize("runtime, field, built, here", [
    (RuntimeInfo("10.14.1.48", BUILT.gpu_name, "9.0"), "tensorrt version", "10.13.3.9",
     "10.14.1.48"),
    (RuntimeInfo(BUILT.tensorrt_version, "NVIDIA L4", "8.9"), "gpu name", BUILT.gpu_name,
     "NVIDIA L4"),
    (RuntimeInfo(BUILT.tensorrt_version, BUILT.gpu_name, "9.1"), "compute capability", "9.0",
     "9.1"),
])
def test_incompatible_runtime_names_both(runtime, field, built, here):
    with pytest.raises(EngineIncompatibleError) as info:
        _sidecar().check_compatible(runtime)
    assert (info.value.field, info.value.built, info.value.runtime) == (field, built, here)
    expected = f"engine was built for {field} {built!r} but this machine has {here!r}"
    assert str(info.value) == expected


def test_engine_file_names():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    name = engine_file("NVIDIA GeForce RTX 4090", "fp32")
    assert name == "model.nvidia-geforce-rtx-4090.fp32.engine"


# ---------------------------------------------------------------------------- precision plan


@pytest.fixture(scope="module")
def graph(tiny_run) -> onnx.ModelProto:
    return onnx.load(str(tiny_run / "export" / "model.onnx"), load_external_data=False)


def test_plan_pins_normalisation_softmax_and_the_router(graph):
    plan = fp32_nodes(graph)
    nodes = {n.name: n for n in graph.graph.node}
    by_type = {}
    for node in graph.graph.node:
        by_type.setdefault(node.op_type, []).append(node.name)
    for op in ("LayerNormalization", "Softmax", "ReduceL2", "TopK"):
        assert by_type[op] and all(name in plan for name in by_type[op]), op
    assert all(plan[n] == "router/kNN top-k" for n in by_type["TopK"])
    # each router's scores are traced back to the matmul that makes them
    scores = [n for n, why in plan.items() if why == "router/kNN scores"]
    assert any(nodes[n].op_type in ("MatMul", "Gemm") for n in scores)
    # and its mask comparisons follow it
    masks = [n for n, why in plan.items() if why == "router/kNN mask"]
    assert masks and all(nodes[n].op_type in ("Less", "GreaterOrEqual", "Where", "Greater",
                                               "LessOrEqual", "Equal") for n in masks)
    # the bulk of the network (patch embedding, attention and MLP matmuls) stays FP16
    matmuls = by_type["MatMul"] + by_type.get("Gemm", [])
    assert sum(name in plan for name in matmuls) <= len(by_type["TopK"]) * 2
    assert not any(name in plan for name in by_type["Conv"])


def test_plan_on_a_hand_made_graph():
    """A router (x @ W + b -> TopK -> logits < kth -> Where), a kNN threshold on the same
    scores, and an expert whose matmul and GELU stay FP16."""
    h = onnx.helper
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["scores"], name="router_mm"),
        h.make_node("Add", ["scores", "b"], ["logits"], name="router_bias"),
        h.make_node("TopK", ["logits", "k"], ["values", "indices"], name="router_topk"),
        h.make_node("Less", ["logits", "values"], ["dropped"], name="router_mask"),
        h.make_node("Where", ["dropped", "ninf", "logits"], ["masked"], name="router_where"),
        h.make_node("Softmax", ["masked"], ["gates"], name="router_softmax"),
        h.make_node("Greater", ["scores", "tau"], ["near"], name="knn_threshold"),
        h.make_node("MatMul", ["x", "w2"], ["h"], name="expert_mm"),
        h.make_node("Erf", ["h"], ["g"], name="expert_gelu"),
    ]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                [2, 4])], [])
    plan = fp32_nodes(h.make_model(graph))
    assert plan == {"router_mm": "router/kNN scores", "router_bias": "router/kNN scores",
                    "router_topk": "router/kNN top-k", "router_mask": "router/kNN mask",
                    "router_where": "router/kNN mask", "knn_threshold": "router/kNN mask",
                    "router_softmax": "softmax"}


def test_layers_map_to_onnx_nodes_by_parser_names():
    plan = {"node_layer_norm": "normalisation", "node_div": "normalisation",
            "node_topk__1": "router/kNN top-k"}
    node_names = ["node_layer_norm", "node_layer_norm_1", "node_div", "node_div_12",
                  "node_topk__1", "node_MatMul_3"]
    layers = [
        ("node_layer_norm", "NORMALIZATION"),
        ("node_layer_norm_1", "ELEMENTWISE"),  # another node, not in the plan
        ("node_div", "ELEMENTWISE"),
        ("node_div_2", "SHUFFLE"),             # a helper layer the parser made for node_div
        ("node_div_12", "ELEMENTWISE"),        # a node of its own, not in the plan
        ("node_topk__1", "TOPK"),
        ("node_MatMul_3", "MATRIX_MULTIPLY"),
        ("ONNXTRT_ShapeTensor_7", "SHAPE"),
        ("fused_softmax", "SOFTMAX"),          # pinned by type whatever its name
    ]
    assert layers_to_pin(layers, plan, node_names) == {
        "node_layer_norm", "node_div", "node_div_2", "node_topk__1", "fused_softmax"}
    assert {"NORMALIZATION", "SOFTMAX"} <= PINNED_LAYER_TYPES
