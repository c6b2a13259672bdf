"""AOTInductor end to end on CPU: compiled package, parity in the manifest, verify, infer,
and the FP16 and format checks that refuse before any work is done."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmdeploy.artifacts import Manifest, RunDir
from mmdeploy.runtime import load_predictor, pick_backend


def test_aoti_export_is_verified_and_recorded(aoti_run):
    manifest = json.loads((aoti_run / "export" / "manifest.json").read_text())
    assert set(manifest["exports"]) == {"onnx", "aoti"}
    record = manifest["exports"]["aoti"]
    assert list(record["files"]) == ["model.pt2"]
    assert record["backend"] == "aoti" and record["device"] == "cpu"
    report = record["check"]
    assert report["passed"] and record["precision"] == report["precision"] == "fp32"
    assert report["criterion"] == {"max_abs": 1e-4, "min_cosine": None, "min_top1_agreement": 1.0}
    assert {c["batch"] for c in report["checks"]} == {1, 7, 8}
    assert {c["inputs"] for c in report["checks"]} == {"random", "real"}
    assert [o["name"] for o in record["outputs"]] == ["logits", "embeddings"]
    # exporting another format leaves the earlier verified ONNX export as it was
    before = json.loads((aoti_run.parent / "manifest-before-aoti.json").read_text())
    assert manifest["exports"]["onnx"] == before["exports"]["onnx"]


def test_each_export_keeps_its_own_batch_range(aoti_run, tmp_path):
    """ONNX exported at 1..64, then AOTInductor at 1..8: each record keeps its range (0.1.0
    kept one range that the later export overwrote, capping the ONNX predictor and the
    Triton config at 8)."""
    manifest = Manifest.load(aoti_run / "export" / "manifest.json")
    assert manifest.exports["onnx"].batch_range == {"min": 1, "opt": 8, "max": 64}
    assert manifest.exports["aoti"].batch_range == {"min": 1, "opt": 4, "max": 8}

    onnx, aoti = load_predictor(aoti_run, "onnxruntime"), load_predictor(aoti_run, "aoti")
    assert (onnx.batch_range, aoti.batch_range) == ((1, 64), (1, 8))
    height, width = onnx.preprocessor.image_size
    pixels = np.random.default_rng(0).normal(size=(64, 3, height, width)).astype(np.float32)
    assert onnx.run_pixels(pixels)["logits"].shape[0] == 64  # one call takes all 64
    onnx_probs, _ = onnx.predict_pixels(pixels)
    aoti_probs, _ = aoti.predict_pixels(pixels)  # eight chunks of 8
    np.testing.assert_allclose(onnx_probs, aoti_probs, atol=1e-5)

    pytest.importorskip("tritonclient", reason="the triton extra is not installed")
    from mmdeploy.exporters.triton import parse_config, repository_name, write_repository

    run = Path(shutil.copytree(aoti_run, tmp_path / "run"))  # the repository is recorded in it
    repository = write_repository(run, tmp_path / "triton", log=lambda line: None)
    config = parse_config(repository / repository_name(RunDir(run)) / "config.pbtxt")
    assert config.max_batch_size == 64


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
