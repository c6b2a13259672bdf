"""AOTInductor end to end on CPU: compiled package, parity in the manifest, verify, infer,
and the FP16 and format checks that refuse before any work is done."""

import json

import pytest

from mmdeploy.runtime import pick_backend


def test_aoti_export_is_verified_and_recorded(aoti_run, tiny_run):
    manifest = json.loads((aoti_run / "export" / "manifest.json").read_text())
    assert {"model.onnx", "model.pt2"} <= set(manifest["files"])
    report = manifest["parity"]["aoti"]
    assert report["passed"] and report["precision"] == "fp32"
    assert report["criterion"] == {"max_abs": 1e-4, "min_cosine": None, "min_top1_agreement": 1.0}
    assert {c["batch"] for c in report["checks"]} == {1, 7, 32}
    assert {c["inputs"] for c in report["checks"]} == {"random", "real"}
    assert manifest["extra"]["aoti"]["device"] == "cpu"
    assert manifest["extra"]["aoti"]["batch_range"] == {"min": 1, "max": 32}
    # exporting another format leaves the earlier verified ONNX export as it was
    before = json.loads((tiny_run / "export" / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"] == before["files"]["model.onnx"]
    assert manifest["parity"]["onnxruntime"] == before["parity"]["onnxruntime"]


def test_verify_rechecks_both_backends(cli, aoti_run):
    result = cli(["verify", aoti_run])
    assert result.code == 0, str(result)
    assert "aoti fp32: passed" in result.stdout
    assert "onnxruntime fp32: passed" in result.stdout
    assert "all 2 exported backend(s) pass parity" in result.stdout


def test_infer_on_aoti_matches_onnxruntime(cli, aoti_run, image_dir, tmp_path):
    rows = {}
    for backend in ("aoti", "onnxruntime"):
        out = tmp_path / f"{backend}.jsonl"
        result = cli(["infer", aoti_run, image_dir, "-o", out, "--backend", backend])
        assert result.code == 0, str(result)
        assert f"backend: {backend} (" in result.stderr
        rows[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "backend: aoti (cpu, fp32)" in cli(
        ["infer", aoti_run, image_dir, "-o", tmp_path / "again.jsonl", "--backend", "aoti"]).stderr
    for a, b in zip(rows["aoti"], rows["onnxruntime"], strict=True):
        assert a["path"] == b["path"] and a["error"] == b["error"]
        if a["error"] is None:
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_default_backend_order_on_cpu(aoti_run):
    """ORT CPU ranks above AOTI CPU; the better ones are passed over with their reasons."""
    chosen, skipped = pick_backend(aoti_run)
    assert chosen == "onnxruntime"
    assert skipped[0].startswith("tensorrt: the run has no verified TensorRT engine")
    assert "onnxruntime on cuda: this onnxruntime has no CUDA provider" in skipped[1]
    assert skipped[2] == "aoti on cuda: model.pt2 is compiled for cpu, not cuda"


def test_fp16_and_unknown_formats_are_refused_up_front(cli, expect_error, run_copy, digest):
    before = digest(run_copy / "export")
    expect_error(cli(["export", "--run", run_copy, "--format", "aoti", "--fp16"]),
                 "--fp16: aoti has no FP16 export here", "CUDA")
    expect_error(cli(["export", "--run", run_copy, "--format", "onnx", "--fp16"]),
                 "none of the requested formats has an FP16 export")
    expect_error(cli(["export", "--run", run_copy, "--format", "onnx,openvino"]),
                 "unknown export format(s) openvino", "available: onnx, aoti, tensorrt")
    assert digest(run_copy / "export") == before


def test_tensorrt_export_without_tensorrt_says_why(cli, expect_error, run_copy):
    from mmdeploy.runtime.tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: tests/runtime/test_tensorrt_gpu.py runs")
    expect_error(cli(["export", "--run", run_copy, "--format", "tensorrt"]),
                 "backend 'tensorrt' is unavailable", reason)
