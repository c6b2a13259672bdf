"""TensorRT for real: build FP32 and FP16 engines from the verified ONNX, parity, load,
and the profile check. Runs only where `tensorrt` imports and a CUDA GPU is present."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmdeploy.errors import InputError
from mmdeploy.runtime.tensorrt import unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"TensorRT path: {REASON}")


@pytest.fixture(scope="module")
def trt_run(tiny_run, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("runs") / "hmmoe-trt"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_passes_parity_and_serves(cli, trt_run, precision):
    args = ["export", "--run", trt_run, "--format", "tensorrt", "--batch-range", "1,4,16"]
    result = cli(args + (["--fp16"] if precision == "fp16" else []))
    assert result.code == 0, str(result)
    manifest = json.loads((trt_run / "export" / "manifest.json").read_text())
    record = manifest["exports"]["tensorrt"]
    assert record["check"]["passed"] and record["precision"] == precision
    assert record["device"] == "cuda" and record["batch_range"] == {"min": 1, "opt": 4, "max": 16}
    info = record["details"]
    assert info["engine"].endswith(f".{precision}.engine") and info["sidecar"] in record["files"]
    sidecar = json.loads((trt_run / "export" / info["sidecar"]).read_text())
    assert sidecar["profile"]["max"][0] == 16 and sidecar["precision"] == precision
    if precision == "fp16":
        assert sidecar["fp32_layers"] > 0

    from mmdeploy.runtime import load_predictor, pick_backend

    assert pick_backend(trt_run)[0] == "tensorrt"
    predictor = load_predictor(trt_run, "tensorrt")
    with pytest.raises(InputError, match=r"input 'pixel_values' has shape \[17, 3"):
        predictor.run_pixels(np.zeros((17, 3, 32, 32), np.float32))


def test_int8_engine_from_the_qdq_graph_passes_the_gate_and_serves(trt_run, tmp_path):
    """TensorRT's explicit quantization: the symmetric QDQ graph, calibrated on the run's
    training images, built with INT8 and FP16 fallback. Held to the accuracy gate (top-1
    agreement, accuracy drop) against the FP32 model, not to max-abs."""
    import onnx

    from mmdeploy.artifacts import RunDir, sha256_file
    from mmdeploy.exporters.calibration import calibration_reader
    from mmdeploy.exporters.gate import GateBounds, candidate_logits, gate_data, measure
    from mmdeploy.exporters.qdq import QDQ_FILE, check_symmetric
    from mmdeploy.exporters.tensorrt import build_int8_engine
    from mmdeploy.runs import load_model, load_run_config
    from mmdeploy.runtime.tensorrt import EngineSidecar, Profile, load_engine

    run = load_run_config(RunDir(trt_run))
    reference = load_model(trt_run)[0]
    preprocessor = reference.backbone.preprocessor
    reader = calibration_reader(run, preprocessor, 32, seed=0)
    profile = Profile.for_batches(1, 8, 32, preprocessor.image_size)
    engine, sidecar, details = build_int8_engine(trt_run / "export" / "model.onnx", tmp_path,
                                                 profile, reader, log=lambda _: None)
    assert engine.endswith(".int8.engine") and sidecar == f"{engine}.json"
    assert check_symmetric(onnx.load(str(tmp_path / QDQ_FILE))) == []
    recorded = EngineSidecar.load(tmp_path / sidecar)
    assert recorded.precision == "int8" and recorded.fp32_layers > 0
    assert recorded.onnx_sha256 == sha256_file(tmp_path / QDQ_FILE) == details["qdq"]["sha256"]

    loaded = load_engine(tmp_path, engine, sidecar)
    data = gate_data(run, reference, preprocessor)
    report = measure(data, candidate_logits(loaded, data.pixels), GateBounds())
    assert report.passed, report.summary()
    with pytest.raises(InputError, match=r"input 'pixel_values' has shape \[33, 3"):
        loaded(np.zeros((33, 3, 32, 32), np.float32))


def test_export_int8_engine_through_the_cli_is_gated_and_verified(cli, trt_run):
    """`export --format tensorrt --int8`: calibrated on the training split, held to the
    accuracy gate (not max-abs parity), published with its QDQ graph, re-checked by verify."""
    result = cli(["export", "--run", trt_run, "--format", "tensorrt", "--int8", "static",
                  "--calib", "32", "--batch-range", "1,8,32"])
    assert result.code == 0, str(result)
    assert "passed the accuracy gate" in result.stdout
    manifest = json.loads((trt_run / "export" / "manifest.json").read_text())
    record = manifest["exports"]["tensorrt"]
    gate = record["check"]
    assert record["precision"] == "int8" and gate["kind"] == "gate" and gate["passed"]
    assert gate["agreement"] >= gate["bounds"]["min_agreement"]
    assert "model.qdq.onnx" in record["files"]
    assert "int8" not in manifest["exports"]  # no ONNX Runtime INT8 graph was asked for
    verified = cli(["verify", trt_run])
    assert verified.code == 0, str(verified)
    assert "tensorrt int8: passed the accuracy gate" in verified.stdout
