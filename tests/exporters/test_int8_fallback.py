"""The gate-driven fallback on small hand-built graphs: an outlier-heavy layer is found and
kept FP32; when the outliers are everywhere, INT8 gives up cleanly.

The graphs are `pixel_values [B, 64] -> MatMul -> Relu -> MatMul -> (x outlier scale) ->
MatMul -> Relu -> head MatMul -> logits`. Scaling one channel of an activation by 1e4
makes per-tensor INT8 of that activation round every other channel to zero: the MatMul
that reads it is the one to keep FP32.
"""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from mmdeploy.exporters.calibration import PixelReader
from mmdeploy.exporters.gate import GateBounds, GateData, candidate_logits, measure
from mmdeploy.exporters.int8 import Quantizer, quantize_gated
from mmdeploy.runtime.onnxruntime import OnnxSession

WIDTH = 64


def outlier_graph(path, outliers_before: tuple[str, ...]) -> None:
    """Four MatMuls (`mm0`..`mm2`, `head`); the input of each MatMul named in
    `outliers_before` carries one channel scaled by 1e4 (its weight row scaled down)."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "pixel_values"
    for index, name in enumerate(["mm0", "mm1", "mm2", "head"]):
        weight = rng.standard_normal((WIDTH, 10 if name == "head" else WIDTH)) / 8
        if name in outliers_before:
            scale = np.ones(WIDTH, np.float32)
            scale[0] = 1e4
            weight[0] /= 1e4  # the same function, an outlier-heavy activation
            inits.append(numpy_helper.from_array(scale, f"scale{index}"))
            nodes.append(helper.make_node("Mul", [current, f"scale{index}"], [f"s{index}"],
                                          name=f"outlier{index}"))
            current = f"s{index}"
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{index}"))
        output = "logits" if name == "head" else f"h{index}"
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [output], name=name))
        current = output
        if name != "head":
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"], name=f"relu{index}"))
            current = f"r{index}"
    graph = helper.make_graph(
        nodes, "outliers",
        [helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def run_fallback(tmp_path, method, outliers_before):
    source = tmp_path / "model.onnx"
    outlier_graph(source, outliers_before)
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((200, WIDTH)).astype(np.float32)
    probe = rng.standard_normal((48, WIDTH)).astype(np.float32)
    reference = candidate_logits(OnnxSession(source), pixels)
    data = GateData(pixels, np.full(len(pixels), -1), reference, "none")
    bounds = GateBounds(min_agreement=0.95)
    calibration = PixelReader(probe, seed=1, split="train") if method == "static" else None
    quantizer = Quantizer(source, method, tmp_path, calibration)
    lines = []
    result = quantize_gated(
        quantizer, lambda path: measure(data, candidate_logits(OnnxSession(path), pixels),
                                        bounds), lambda: probe, lines.append)
    return quantizer, result, lines


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_the_outlier_layer_is_kept_fp32_and_the_gate_then_passes(tmp_path, method):
    quantizer, result, lines = run_fallback(tmp_path, method, ("mm2",))
    assert quantizer.excluded_from_start == ["head"]  # the cosine head, from the start
    assert "FAILED the gate" in lines[0]  # naive INT8 fails...
    first = result.fallback_steps[0]
    assert first["kept_fp32"] == ["mm2"] and first["sensitivity"] > 0
    assert result.kept_fp32 == ["mm2"]  # ...and one step, the outlier layer, fixes it
    assert result.report.passed and result.report.agreement >= 0.95
    assert result.int8_share == pytest.approx(2 / 3)
    assert result.stopped is None
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert ("MatMulInteger" in ops) if method == "dynamic" else ("QuantizeLinear" in ops)
    assert (result.calibration is None) == (method == "dynamic")


def test_outliers_everywhere_stop_when_int8_no_longer_pays(tmp_path):
    _, result, lines = run_fallback(tmp_path, "dynamic", ("mm1", "mm2"))
    assert not result.report.passed
    assert len(result.kept_fp32) == 1  # a second layer would put 2/3 of the work in FP32
    assert "INT8 stops paying beyond 50%" in result.stopped
    assert "stopping" in lines[-1]
    with pytest.raises(Exception, match="INT8 failed the accuracy gate: top1_agreement") as err:
        result.raise_if_failed("model.int8.onnx.failed")
    assert "kept aside as model.int8.onnx.failed" in str(err.value)


@pytest.mark.parametrize("calibrate_method", ["minmax", "entropy", "percentile"])
def test_static_calibration_runs_batch_by_batch_for_every_method(tmp_path, calibrate_method):
    """40 images: batches of 16, 16 and 8 (histogram methods cannot stack ragged batches)."""
    source = tmp_path / "model.onnx"
    outlier_graph(source, ())
    pixels = np.random.default_rng(2).standard_normal((40, WIDTH)).astype(np.float32)
    reader = PixelReader(pixels, seed=2, split="train")
    assert len(reader) == 3
    quantizer = Quantizer(source, "static", tmp_path, reader, calibrate_method)
    ops = [n.op_type for n in onnx.load(str(quantizer.build([]))).graph.node]
    assert ops.count("MatMul") == 4 and "QuantizeLinear" in ops
    assert quantizer.calibration_record == {"images": 40, "method": calibrate_method,
                                            "seed": 2, "split": "train"}
    quantizer.build(["mm0"])  # the fallback's builds re-use the cached ranges
    assert (tmp_path / "calibration.json").is_file()
