"""The INT8 methods on the session's tiny HMMoE graph: per-channel weight scales, smoothing
(exact in FP32), symmetric QDQ (TensorRT-ready), calibration reproducible by seed, and the
fallback's structural order (the adapter's matmuls, the first and the last block)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mmdeploy.artifacts import RunDir
from mmdeploy.exporters.calibration import PixelReader, calibration_reader
from mmdeploy.exporters.int8 import Int8Options, Quantizer, fp32_from_start, quantizable
from mmdeploy.exporters.smoothing import activation_maxima, smooth, smoothed_inputs
from mmdeploy.exporters.structure import structure
from mmdeploy.runs import load_model, load_run_config
from mmdeploy.runtime.onnxruntime import OnnxSession


@pytest.fixture(scope="module")
def fp32_path(tiny_run) -> Path:
    return tiny_run / "export" / "model.onnx"


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((12, 3, 32, 32), dtype=np.float32)


def quantizer(fp32_path, tmp_path, method, pixels, **options) -> Quantizer:
    reader = PixelReader(pixels, seed=0, split="train")
    return Quantizer(fp32_path, method, tmp_path, reader, options=Int8Options(**options),
                     adapter_weights=fp32_path.parent.parent / "adapter_model.safetensors")


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_smoothing_is_exact_in_fp32_and_folded_into_the_layernorms(fp32_path, pixels,
                                                                   tmp_path):
    model = onnx.load(str(fp32_path))
    work = quantizable(model, fp32_from_start(model))
    readers = smoothed_inputs(model, work)
    maxima = activation_maxima(model, pixels, list(readers), tmp_path)
    smoothed, done = smooth(model, maxima, readers, alpha=0.5)
    assert done.folded and done.multiplied and len(done.matmuls) == len(
        [n for names in readers.values() for n in names])
    assert done.min_factor < 1 < done.max_factor  # outliers moved, not a no-op
    factors = np.log2([done.min_factor, done.max_factor])
    assert np.array_equal(factors, np.round(factors))  # powers of two
    norms = {n.name: n for n in smoothed.graph.node if n.op_type == "LayerNormalization"}
    assert all(norms[name].input[1].endswith(".smoothed." + name) for name in done.folded)
    path = tmp_path / "smoothed.onnx"
    onnx.save(smoothed, str(path))
    original, after = OnnxSession(fp32_path)(pixels), OnnxSession(path)(pixels)
    for name, value in original.items():  # the same numbers, not merely close ones
        assert np.array_equal(after[name], value), name


def test_per_channel_dynamic_has_a_scale_per_output_channel(fp32_path, pixels, tmp_path):
    q = quantizer(fp32_path, tmp_path, "dynamic", pixels, per_channel=True)
    fp32 = OnnxSession(fp32_path)(pixels)["logits"]
    assert np.array_equal(OnnxSession(q.source)(pixels)["logits"], fp32)  # prepared: exact
    prepared = onnx.load(str(q.source))
    assert not [n for n in prepared.graph.node if n.op_type == "Gemm" and n.name in q.work
                and any(a.name == "transB" and a.i for a in n.attribute)]
    path = q.build([])
    graph = onnx.load(str(path))
    values = initializers(path)
    weights = {n.input[1]: n for n in graph.graph.node if n.op_type == "MatMulInteger"}
    assert len(weights) >= len(q.work) - 1  # the head Gemm stays FP32 (excluded from start)
    for node in weights.values():
        weight, scale = values[node.input[1]], values[node.input[1].replace(
            "_quantized", "_scale")]
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[-1],)
        assert np.unique(scale).size > 1
    int8 = OnnxSession(path)(pixels)["logits"]
    cosine = (int8 * fp32).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosine.min() > 0.9


@pytest.mark.parametrize("symmetric", [False, True])
def test_static_records_whether_its_graph_is_tensorrt_ready(fp32_path, pixels, tmp_path,
                                                            symmetric):
    from mmdeploy.exporters.int8 import tensorrt_problems

    q = quantizer(fp32_path, tmp_path, "static", pixels, symmetric=symmetric,
                  smooth_alpha=0.5)
    path = q.build([])
    problems = tensorrt_problems(path)
    if symmetric:
        assert problems == []
        q_nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
        values = initializers(path)
        assert q_nodes and all(values[n.input[2]].dtype == np.int8
                               and not values[n.input[2]].any() for n in q_nodes)
    else:
        assert any("UINT8" in problem for problem in problems)  # U8 activations
    assert q.smoothing is not None and q.calibration_record["seed"] == 0


def test_calibration_is_reproducible_by_seed(tiny_run):
    run = load_run_config(RunDir(tiny_run))
    preprocessor = load_model(tiny_run)[0].backbone.preprocessor
    first, again, other = (calibration_reader(run, preprocessor, 8, seed)
                           for seed in (3, 3, 4))
    assert first.names == again.names and np.array_equal(first.pixels, again.pixels)
    assert first.names != other.names
    assert (first.seed, first.split, len(first.pixels)) == (3, "train", 8)


def test_the_fallback_tries_the_adapter_then_the_first_and_last_blocks(fp32_path, pixels,
                                                                       tmp_path):
    model = onnx.load(str(fp32_path))
    work = quantizable(model, fp32_from_start(model))
    found = structure(model, list(work), fp32_path.parent.parent / "adapter_model.safetensors")
    assert len(found.blocks) == 4  # the tiny tower's four blocks, each ending in its fc2
    assert found.adapter and not set(found.adapter) & {n for b in found.blocks for n in b}
    assert sorted([*found.adapter, *(n for b in found.blocks for n in b)]) == sorted(work)
    nodes = {n.name: n for n in model.graph.node}
    assert all(nodes[n].op_type == "MatMul" for n in found.blocks[0][:3])  # q, k, v first
    q = quantizer(fp32_path, tmp_path, "dynamic", pixels)
    assert [why for why, _ in q.first_groups()] == ["adapter", "first block", "last block"]
    (tmp_path / "measured").mkdir()
    measured = quantizer(fp32_path, tmp_path / "measured", "dynamic", pixels,
                         fallback_order="measured")
    assert measured.first_groups() == []


def test_bad_int8_options_are_one_error_line(tiny_run, cli, expect_error):
    expect_error(cli(["export", "--run", tiny_run, "--int8", "dynamic", "--int8-symmetric"]),
                 "--int8-symmetric", "--int8 static")
    result = cli(["export", "--run", tiny_run, "--int8", "--smooth", "1.5"])
    assert result.code != 0 and "1.5" in result.stderr
