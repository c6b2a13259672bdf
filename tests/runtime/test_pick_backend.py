"""`pick_backend` walks the backend table on fake runs: a manifest with the export records
under test (no model files: the choice reads records, not weights) and this machine's
devices faked in each backend's `problem`. Each combination of missing, present and
unverified exports gives the documented choice and the reasons for every faster backend
passed over."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from mmdeploy.artifacts import ExportRecord, Manifest, RunDir
from mmdeploy.errors import ArtifactError, BackendUnavailableError, ConfigError
from mmdeploy.runtime import BACKEND_TABLE, RANKING, default_precision, pick_backend

FIXTURES = Path(__file__).parent.parent / "fixtures"
NO_CUDA = "no CUDA device here"


def record(backend: str, main_file: str, passed: bool = True, precision: str = "fp32",
           device: str | None = None, **details) -> ExportRecord:
    kind = "gate" if precision == "int8" else "parity"
    return ExportRecord(backend=backend, precision=precision,
                        batch_range={"min": 1, "opt": 8, "max": 64},
                        check={"kind": kind, "passed": passed},
                        files={main_file: {"sha256": "0" * 64, "size": 1}}, device=device,
                        details=details)


ONNX = record("onnxruntime", "model.onnx")
AOTI_CPU = record("aoti", "model.pt2", device="cpu")
AOTI_CUDA = record("aoti", "model.pt2", device="cuda")
TENSORRT = record("tensorrt", "model.h100.fp16.engine", precision="fp16")
INT8 = record("onnxruntime", "model.int8.onnx", precision="int8", serve_default=False)


def fake_run(tmp_path: Path, **exports: ExportRecord) -> Path:
    run = tmp_path / "run"
    run_dir = RunDir(run)
    if exports:
        run_dir.export_dir.mkdir(parents=True)
        Manifest(exports=exports).save(run_dir.manifest_path)
    else:
        run.mkdir()
    return run


@pytest.fixture
def machine(monkeypatch):
    """`machine(cuda=..., tensorrt=...)`: what this fake machine can run. AOTInductor's
    check of the compiled-for device is the real one."""

    def configure(cuda: bool = False, tensorrt: str | None = "tensorrt is not installed"):
        def onnxruntime_problem(device, export, run_dir):
            if device == "cuda" and export.precision == "int8":
                return "INT8 graphs are served on the CPU provider"
            return None if device == "cpu" or cuda else "this onnxruntime has no CUDA provider"

        def aoti_problem(device, export, run_dir):
            if export.device != device:
                return f"{export.main_file} is compiled for {export.device}, not {device}"
            return None if device == "cpu" or cuda else NO_CUDA

        problems = {"onnxruntime": onnxruntime_problem, "aoti": aoti_problem,
                    "tensorrt": lambda device, export, run_dir: tensorrt}
        for name, problem in problems.items():
            monkeypatch.setitem(BACKEND_TABLE, name,
                                dataclasses.replace(BACKEND_TABLE[name], problem=problem))

    return configure


def test_ranking_is_designs_order():
    assert RANKING == (("tensorrt", "cuda"), ("onnxruntime", "cuda"), ("aoti", "cuda"),
                       ("onnxruntime", "cpu"), ("aoti", "cpu"), ("torch", None))


def test_no_export_means_torch_with_one_reason_per_backend(tmp_path, machine):
    machine()
    backend, skipped = pick_backend(fake_run(tmp_path))
    no_export = "the run has no export (run `mmdeploy export --format onnx`)"
    assert backend == "torch"
    assert skipped == [f"tensorrt: {no_export}", f"onnxruntime: {no_export}",
                       f"aoti: {no_export}"]


def test_onnx_on_a_cpu_machine(tmp_path, machine):
    machine()
    backend, skipped = pick_backend(fake_run(tmp_path, onnx=ONNX))
    assert backend == "onnxruntime"
    assert skipped == [
        "tensorrt: the run has no verified TensorRT engine (`mmdeploy export --format "
        "tensorrt` on a GPU machine)",
        "onnxruntime on cuda: this onnxruntime has no CUDA provider",
        "aoti: the run has no verified AOTInductor package (`mmdeploy export --format aoti`)"]


def test_onnx_runtime_beats_aoti_on_the_cpu(tmp_path, machine):
    machine()
    backend, skipped = pick_backend(fake_run(tmp_path, onnx=ONNX, aoti=AOTI_CPU))
    assert backend == "onnxruntime"
    assert "aoti on cuda: model.pt2 is compiled for cpu, not cuda" in skipped


def test_aoti_alone_serves_on_the_device_it_was_compiled_for(tmp_path, machine):
    machine()
    backend, skipped = pick_backend(fake_run(tmp_path, aoti=AOTI_CPU))
    assert backend == "aoti"
    assert skipped[-1] == "aoti on cuda: model.pt2 is compiled for cpu, not cuda"


def test_a_cuda_package_on_a_machine_without_cuda_falls_back_to_torch(tmp_path, machine):
    machine()
    backend, skipped = pick_backend(fake_run(tmp_path, aoti=AOTI_CUDA))
    assert backend == "torch"
    assert f"aoti on cuda: {NO_CUDA}" in skipped
    assert "aoti on cpu: model.pt2 is compiled for cuda, not cpu" in skipped


def test_an_unverified_export_is_passed_over_with_its_check(tmp_path, machine):
    machine()
    failed = record("onnxruntime", "model.onnx", passed=False)
    backend, skipped = pick_backend(fake_run(tmp_path, onnx=failed, aoti=AOTI_CPU))
    assert backend == "aoti"
    assert "onnxruntime: model.onnx did not pass its parity" in skipped


def test_on_a_gpu_machine_tensorrt_then_onnxruntime_cuda_then_aoti_cuda(tmp_path, machine):
    machine(cuda=True, tensorrt=None)
    everything = {"onnx": ONNX, "aoti": AOTI_CUDA, "tensorrt": TENSORRT}
    assert pick_backend(fake_run(tmp_path / "a", **everything)) == ("tensorrt", [])
    machine(cuda=True, tensorrt="engine built for NVIDIA H100, this is NVIDIA L4")
    backend, skipped = pick_backend(fake_run(tmp_path / "b", **everything))
    assert (backend, skipped) == (
        "onnxruntime", ["tensorrt on cuda: engine built for NVIDIA H100, this is NVIDIA L4"])
    backend, skipped = pick_backend(fake_run(tmp_path / "c", aoti=AOTI_CUDA))
    assert backend == "aoti" and skipped[-1].startswith("onnxruntime: the run has no verified")


def test_a_requested_backend_is_used_or_refused_with_its_reasons(tmp_path, machine):
    machine()
    run = fake_run(tmp_path, onnx=ONNX, aoti=AOTI_CPU)
    assert pick_backend(run, "aoti") == ("aoti", [])
    assert pick_backend(run, "torch") == ("torch", [])
    with pytest.raises(BackendUnavailableError, match="the run has no verified TensorRT"):
        pick_backend(run, "tensorrt")
    with pytest.raises(BackendUnavailableError, match="tensorrt is not installed"):
        pick_backend(fake_run(tmp_path / "engine", onnx=ONNX, tensorrt=TENSORRT), "tensorrt")
    with pytest.raises(ConfigError, match="unknown backend 'openvino'"):
        pick_backend(run, "openvino")


def test_int8_is_served_by_onnxruntime_only(tmp_path, machine):
    machine()
    run = fake_run(tmp_path, onnx=ONNX, int8=INT8)
    backend, skipped = pick_backend(run, precision="int8")
    assert backend == "onnxruntime"
    assert skipped == ["other backends: INT8 is served by onnxruntime only",
                       "onnxruntime on cuda: INT8 graphs are served on the CPU provider"]
    with pytest.raises(BackendUnavailableError, match="INT8 is served by onnxruntime only"):
        pick_backend(run, "torch", precision="int8")
    with pytest.raises(BackendUnavailableError,
                       match="int8: the run has no verified INT8 export"):
        pick_backend(fake_run(tmp_path / "fp32-only", onnx=ONNX), precision="int8")
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        pick_backend(run, precision="int4")


def test_default_precision_follows_the_int8_export(tmp_path):
    assert default_precision(fake_run(tmp_path / "a", onnx=ONNX)) == "fp32"
    assert default_precision(fake_run(tmp_path / "b", onnx=ONNX, int8=INT8)) == "fp32"
    serving = record("onnxruntime", "model.int8.onnx", precision="int8", serve_default=True)
    assert default_precision(fake_run(tmp_path / "c", onnx=ONNX, int8=serving)) == "int8"
    unverified = dataclasses.replace(serving, check={"kind": "gate", "passed": False})
    assert default_precision(fake_run(tmp_path / "d", onnx=ONNX, int8=unverified)) == "fp32"


def test_a_manifest_written_by_0_1_0_is_refused_in_one_line(tmp_path, machine):
    """Version 0.1.0 kept one batch range for every format; such a run's exports are not
    served (torch is, and says why) until it is re-exported."""
    machine()
    run = fake_run(tmp_path)
    RunDir(run).export_dir.mkdir()
    shutil.copy(FIXTURES / "manifest-0.1.0.json", RunDir(run).manifest_path)
    assert "parity" in json.loads(RunDir(run).manifest_path.read_text())  # the old layout
    with pytest.raises(ArtifactError) as caught:
        Manifest.load(RunDir(run).manifest_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "manifest format 1 (mmdeploy 0.1.0), this mmdeploy reads 2" in message
    assert "re-export the run" in message
    backend, skipped = pick_backend(run)
    assert backend == "torch" and all(message in line for line in skipped)
