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
    assert manifest["parity"]["tensorrt"]["passed"]
    assert manifest["parity"]["tensorrt"]["precision"] == precision
    info = manifest["extra"]["tensorrt"]
    assert info["engine"].endswith(f".{precision}.engine") and info["sidecar"] in manifest["files"]
    sidecar = json.loads((trt_run / "export" / info["sidecar"]).read_text())
    assert sidecar["profile"]["max"][0] == 16 and sidecar["precision"] == precision
    if precision == "fp16":
        assert sidecar["fp32_layers"] > 0

    from mmdeploy.runtime import load_predictor, pick_backend

    assert pick_backend(trt_run)[0] == "tensorrt"
    predictor = load_predictor(trt_run, "tensorrt")
    with pytest.raises(InputError, match=r"input 'pixel_values' has shape \[17, 3"):
        predictor.run_pixels(np.zeros((17, 3, 32, 32), np.float32))
