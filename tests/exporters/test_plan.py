"""Which formats an export builds, at which precision, before anything is loaded."""

from __future__ import annotations

import pytest

from mmdeploy.artifacts import ExportRecord, Manifest
from mmdeploy.config import ExportConfig
from mmdeploy.errors import BackendUnavailableError, ConfigError
from mmdeploy.exporters import formats


@pytest.fixture
def tensorrt_present(monkeypatch):
    """Plan as on a GPU machine with TensorRT (nothing is built by planning)."""
    monkeypatch.setattr(formats, "unavailable_reason", lambda: None)


def test_onnx_comes_first_and_is_brought_in_for_tensorrt(tensorrt_present):
    plan = formats.plan_formats(("tensorrt", "aoti"), False, "cuda", has_onnx=False)
    assert plan == [("onnx", "fp32"), ("aoti", "fp32"), ("tensorrt", "fp32")]
    assert formats.plan_formats(("tensorrt",), False, "cuda", has_onnx=True) == \
        [("tensorrt", "fp32")]


def test_fp16_builds_fp16_where_there_is_a_path(tensorrt_present):
    plan = formats.plan_formats(("onnx", "tensorrt"), True, "cuda", has_onnx=False)
    assert plan == [("onnx", "fp32"), ("tensorrt", "fp16")]
    with pytest.raises(ConfigError, match="none of the requested formats"):
        formats.plan_formats(("onnx",), True, "cpu", has_onnx=False)


def test_int8_builds_a_tensorrt_int8_engine(tensorrt_present):
    plan = formats.plan_formats(("tensorrt",), False, "cuda", has_onnx=True, int8=True)
    assert plan == [("tensorrt", "int8")]
    plan = formats.plan_formats(("onnx", "tensorrt"), True, "cuda", has_onnx=False, int8=True)
    assert plan == [("onnx", "fp32"), ("tensorrt", "int8")]  # INT8 engines fall back to FP16


def test_tensorrt_without_tensorrt_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(formats, "unavailable_reason", lambda: "tensorrt is not installed")
    with pytest.raises(BackendUnavailableError, match="tensorrt is not installed"):
        formats.plan_formats(("tensorrt",), False, "cpu", has_onnx=True, int8=True)


def _verified_onnx() -> Manifest:
    onnx = ExportRecord(backend="onnxruntime", precision="fp32",
                        batch_range={"min": 1, "opt": 8, "max": 32},
                        check={"kind": "parity", "passed": True},
                        files={"model.onnx": {"sha256": "0" * 64, "size": 1}})
    return Manifest(exports={"onnx": onnx})


@pytest.mark.parametrize(("requested", "manifest", "expected"), [
    ((), _verified_onnx(), ((), True)),  # quantize the run's verified graph
    ((), Manifest(), (("onnx",), True)),  # export it first
    (("onnx", "aoti"), Manifest(), (("onnx", "aoti"), True)),
    (("tensorrt",), _verified_onnx(), (("tensorrt",), False)),  # a TensorRT INT8 engine
])
def test_what_int8_quantizes(requested, manifest, expected):
    has_onnx = manifest.record("onnx") is not None
    assert formats._int8_targets(requested, ExportConfig(int8="dynamic"), has_onnx) == expected
    assert formats._int8_targets(requested, ExportConfig(), has_onnx) == (requested, False)


def test_int8_with_only_aoti_is_refused():
    with pytest.raises(ConfigError, match="add one to --format"):
        formats._int8_targets(("aoti",), ExportConfig(int8="dynamic"), has_onnx=False)
