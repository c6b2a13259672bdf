"""Provider choice for ONNX Runtime: TensorRT and CUDA when onnxruntime-gpu has them (and
TensorRT's libraries are there), CPU otherwise, and the predictor says which one ran."""

import onnxruntime

from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor, choose_providers

ALL_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cpu_only_onnxruntime_chooses_cpu_and_says_why():
    choice = choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"], False)
    assert choice.providers == ["CPUExecutionProvider"]
    assert choice.skipped == [
        "TensorrtExecutionProvider: not in this onnxruntime (pip install "
        "'mm-peft-deploy[gpu]' where onnxruntime is not installed)",
        "CUDAExecutionProvider: not in this onnxruntime (pip install "
        "'mm-peft-deploy[gpu]' where onnxruntime is not installed)",
    ]


def test_onnxruntime_gpu_without_tensorrt_uses_cuda():
    choice = choose_providers(ALL_GPU, tensorrt_importable=False)
    assert choice.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert len(choice.skipped) == 1
    assert "TensorRT's libraries are not installed" in choice.skipped[0]


def test_onnxruntime_gpu_with_tensorrt_uses_both_gpu_providers_first():
    choice = choose_providers(ALL_GPU, tensorrt_importable=True)
    assert choice.providers == ALL_GPU and choice.skipped == []


def test_this_machine_runs_on_what_onnxruntime_offers(tiny_run):
    predictor = OnnxRuntimePredictor(tiny_run)
    expected = choose_providers(onnxruntime.get_available_providers(), False).providers[0]
    assert predictor.session.provider == expected
    assert predictor.describe() == f"onnxruntime ({expected})"
    assert predictor.session.on_gpu == (expected != "CPUExecutionProvider")
