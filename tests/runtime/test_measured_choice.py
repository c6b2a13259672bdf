"""The backend chosen by measurement: `pick_backend` serves the fastest export timed on this
machine's device model (timings kept in the export records by `export --format auto` and
`bench --record`), ignores timings made on another device model (saying so once), and keeps
the fixed order where it has none. Fake runs as in test_pick_backend.py (records, no model
files) with this machine's devices and device models faked; then `export --format auto`
and the timing of two real exports on the session's runs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from mmdeploy.artifacts import ExportRecord, Manifest, RecordedTiming, RunDir
from mmdeploy.bench.backends import BenchResult, Row, record_timings
from mmdeploy.errors import ArtifactError
from mmdeploy.exporters import formats
from mmdeploy.exporters.export import _time_exports
from mmdeploy.runtime import BACKEND_TABLE, pick_backend, timing
from mmdeploy.runtime.timing import Timing

HERE_CPU, HERE_GPU = "Test CPU 9000 @ 3.00GHz", "NVIDIA L4"
NO_ENGINE = ("tensorrt: the run has no verified TensorRT engine (`mmdeploy export --format "
             "tensorrt` on a GPU machine)")


def timed(device: str, median_ms: float, batch: int = 8, name: str | None = None,
          source: str = "export") -> RecordedTiming:
    name = name or {"cpu": HERE_CPU, "cuda": HERE_GPU}[device]
    return RecordedTiming(device=device, device_name=name, batch=batch, median_ms=median_ms,
                          measured_at="2025-01-01T00:00:00+00:00", source=source)


def record(backend: str, main_file: str, *timings: RecordedTiming,
           device: str | None = None) -> ExportRecord:
    return ExportRecord(backend=backend, precision="fp32",
                        batch_range={"min": 1, "opt": 8, "max": 32},
                        check={"kind": "parity", "passed": True},
                        files={main_file: {"sha256": "0" * 64, "size": 1}}, device=device,
                        timings=list(timings))


def onnx(*timings: RecordedTiming) -> ExportRecord:
    return record("onnxruntime", "model.onnx", *timings)


def aoti(device: str, *timings: RecordedTiming) -> ExportRecord:
    return record("aoti", "model.pt2", *timings, device=device)


def fake_run(tmp_path: Path, **exports: ExportRecord) -> Path:
    run_dir = RunDir(tmp_path / "run")
    run_dir.export_dir.mkdir(parents=True)
    Manifest(exports=exports).save(run_dir.manifest_path)
    return run_dir.root


@pytest.fixture
def machine(monkeypatch):
    """`machine(cuda=..., tensorrt=...)`: what this fake machine runs, and its device
    models (HERE_CPU, HERE_GPU)."""

    def configure(cuda: bool = False, tensorrt: str | None = "tensorrt is not installed"):
        def onnxruntime_problem(device, export, run_dir):
            return None if device == "cpu" or cuda else "this onnxruntime has no CUDA provider"

        def aoti_problem(device, export, run_dir):
            if export.device != device:
                return f"{export.main_file} is compiled for {export.device}, not {device}"
            return None if device == "cpu" or cuda else "no CUDA device here"

        problems = {"onnxruntime": onnxruntime_problem, "aoti": aoti_problem,
                    "tensorrt": lambda device, export, run_dir: tensorrt}
        for name, problem in problems.items():
            monkeypatch.setitem(BACKEND_TABLE, name,
                                dataclasses.replace(BACKEND_TABLE[name], problem=problem))
        monkeypatch.setattr(timing, "device_name",
                            lambda device: {"cpu": HERE_CPU, "cuda": HERE_GPU}[device])

    return configure


ABOVE_ORT_CPU = [NO_ENGINE, "onnxruntime on cuda: this onnxruntime has no CUDA provider",
                 "aoti on cuda: model.pt2 is compiled for cpu, not cuda"]


def test_the_fastest_timed_here_wins_and_says_so(tmp_path, machine):
    machine()
    run = fake_run(tmp_path / "a", onnx=onnx(timed("cpu", 3.0)), aoti=aoti("cpu", timed("cpu", 2)))
    assert pick_backend(run) == ("aoti", [
        *ABOVE_ORT_CPU,
        "onnxruntime on cpu: 3.00 ms at batch 8 here; aoti on cpu took 2.00 ms at batch 8, "
        "the fastest per image of the 2 timed here"])
    run = fake_run(tmp_path / "b", onnx=onnx(timed("cpu", 2.0)), aoti=aoti("cpu", timed("cpu", 3)))
    backend, skipped = pick_backend(run)
    assert backend == "onnxruntime"
    assert skipped[-1] == ("aoti on cpu: 3.00 ms at batch 8 here; onnxruntime on cpu took "
                           "2.00 ms at batch 8, the fastest per image of the 2 timed here")


def test_timings_at_different_batches_compare_per_image(tmp_path, machine):
    machine()
    run = fake_run(tmp_path, onnx=onnx(timed("cpu", 10.0, batch=8)),  # 1.25 ms per image
                   aoti=aoti("cpu", timed("cpu", 2.0, batch=1)))  # 2 ms per image
    assert pick_backend(run)[0] == "onnxruntime"


def test_a_timing_made_on_another_device_model_is_ignored_and_said_once(tmp_path, machine):
    machine()
    elsewhere = "Other CPU 1000"
    run = fake_run(tmp_path / "a", onnx=onnx(timed("cpu", 9.0, name=elsewhere)),
                   aoti=aoti("cpu", timed("cpu", 1.0, name=elsewhere)))
    backend, skipped = pick_backend(run)
    stale = f"timings made on another cpu ('{elsewhere}'; this machine has '{HERE_CPU}')"
    assert (backend, skipped) == ("onnxruntime", [stale, *ABOVE_ORT_CPU])  # the fixed order

    # timed here beats faster timed elsewhere; a record timed on both machines keeps both
    run = fake_run(tmp_path / "b", onnx=onnx(timed("cpu", 5.0), timed("cpu", 1.0, name=elsewhere)),
                   aoti=aoti("cpu", timed("cpu", 3.0, name=elsewhere)))
    backend, skipped = pick_backend(run)
    assert backend == "onnxruntime" and skipped == [stale, *ABOVE_ORT_CPU]


def test_without_timings_the_fixed_order(tmp_path, machine):
    machine()
    assert pick_backend(fake_run(tmp_path / "a", onnx=onnx(), aoti=aoti("cpu"))) == (
        "onnxruntime", ABOVE_ORT_CPU)
    assert pick_backend(fake_run(tmp_path / "b", aoti=aoti("cpu"))) == ("aoti", [
        NO_ENGINE, "onnxruntime: the run has no verified ONNX export (`mmdeploy export "
        "--format onnx`)", "aoti on cuda: model.pt2 is compiled for cpu, not cuda"])
    # timings only for a device this machine lacks: the fixed order too, nothing said
    run = fake_run(tmp_path / "c", onnx=onnx(timed("cuda", 0.5)), aoti=aoti("cpu"))
    assert pick_backend(run) == ("onnxruntime", ABOVE_ORT_CPU)


def test_an_untimed_backend_ranked_above_the_fastest_is_said(tmp_path, machine):
    machine(cuda=True, tensorrt=None)
    engine = record("tensorrt", "model.nvidia-l4.fp16.engine")
    run = fake_run(tmp_path, onnx=onnx(timed("cuda", 2.0)), aoti=aoti("cuda", timed("cuda", 3.0)),
                   tensorrt=engine)
    assert pick_backend(run) == ("onnxruntime", [
        "tensorrt on cuda: not timed on this machine, onnxruntime on cuda was (2.00 ms at "
        "batch 8); `mmdeploy bench RUN --record` times both",
        "aoti on cuda: 3.00 ms at batch 8 here; onnxruntime on cuda took 2.00 ms at batch 8, "
        "the fastest per image of the 2 timed here"])


def test_a_requested_backend_is_unchanged_by_timings(tmp_path, machine):
    machine()
    run = fake_run(tmp_path, onnx=onnx(timed("cpu", 1.0)), aoti=aoti("cpu", timed("cpu", 9.0)))
    assert pick_backend(run, "aoti") == ("aoti", [])
    assert pick_backend(run, "torch") == ("torch", [])


def test_timings_are_optional_in_a_manifest_and_kept_per_device_model(tmp_path):
    path = tmp_path / "manifest.json"
    Manifest(exports={"onnx": onnx()}).save(path)
    data = json.loads(path.read_text())
    del data["exports"]["onnx"]["timings"]  # as written before timings were kept
    path.write_text(json.dumps(data))
    loaded = Manifest.load(path)
    assert loaded.exports["onnx"].timings == []

    loaded.exports["onnx"].add_timing(timed("cpu", 4.0))
    loaded.exports["onnx"].add_timing(timed("cpu", 6.0, name="Other CPU"))
    loaded.exports["onnx"].add_timing(timed("cpu", 3.0, source="bench"))  # replaces 4.0
    loaded.save(path)
    again = Manifest.load(path).exports["onnx"]
    assert [(t.device_name, t.median_ms, t.source) for t in again.timings] == [
        ("Other CPU", 6.0, "export"), (HERE_CPU, 3.0, "bench")]
    assert again.timing("cpu", HERE_CPU).median_ms == 3.0 and again.timing("cuda", HERE_GPU) is None

    data = json.loads(path.read_text())
    data["exports"]["onnx"]["timings"][0]["batch"] = "8"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="a timing needs a positive integer batch"):
        Manifest.load(path)


def test_bench_record_keeps_the_row_nearest_each_exports_opt_batch(tmp_path, machine):
    machine()
    run = fake_run(tmp_path, onnx=onnx(), aoti=aoti("cpu"))

    def row(backend: str, batch: int, median_ms: float) -> Row:
        return Row(backend, "cpu", "fp32", batch, Timing(median_ms, median_ms, 1.0, None, None))

    result = BenchResult("", "", {}, {}, str(run), "hmmoe", "tiny", [32, 32], {}, rows=[
        row("eager", 8, 9.0), row("onnxruntime", 1, 1.0), row("onnxruntime", 8, 4.0),
        row("onnxruntime", 32, 12.0), row("aoti", 1, 0.4), row("aoti", 32, 30.0)])
    assert record_timings(run, result) == ["recorded onnxruntime on cpu: 4.00 ms at batch 8",
                                           "recorded aoti on cpu: 0.40 ms at batch 1"]
    exports = Manifest.load(RunDir(run).manifest_path).exports
    assert [(t.batch, t.median_ms, t.source) for t in exports["onnx"].timings] == [
        (8, 4.0, "bench")]
    assert exports["onnx"].timings[0].device_name == HERE_CPU
    assert pick_backend(run)[0] == "aoti"  # 0.4 ms per image against 0.5


def test_export_auto_builds_what_it_can_times_it_and_serves_by_it(cli, run_copy, monkeypatch):
    """End to end on the session run: AOTInductor is left out (as on a machine without a C++
    compiler; its compile is timed below on the session's AOTInductor run instead)."""
    monkeypatch.setitem(formats.FORMATS, "aoti", dataclasses.replace(
        formats.FORMATS["aoti"], build_problem=lambda device: "no C++ compiler (test)"))
    result = cli(["export", "--run", run_copy, "--format", "auto", "--batch-range", "1,2,3"])
    assert result.code == 0, str(result)
    assert "auto: leaving out aoti: no C++ compiler (test)" in result.stdout
    assert "will export onnx (fp32)" in result.stdout
    assert "timed onnxruntime on cpu: " in result.stdout and " ms at batch 2 (median of 10)" \
        in result.stdout
    assert "infer and serve will use onnxruntime" in result.stdout
    (recorded,) = Manifest.load(RunDir(run_copy).manifest_path).exports["onnx"].timings
    assert (recorded.device, recorded.batch, recorded.source) == ("cpu", 2, "export")
    assert recorded.device_name == timing.cpu_name() and recorded.median_ms > 0
    backend, skipped = pick_backend(run_copy)
    assert backend == "onnxruntime" and not any("another" in line for line in skipped)


def test_two_real_exports_timed_the_faster_serves(aoti_run, tmp_path):
    """The session's ONNX (1..8..64) and AOTInductor (1..4..8) exports timed as `export
    --format auto` times them: each at its own OPT batch, compared per image."""
    run = Path(shutil.copytree(aoti_run, tmp_path / "run"))
    run_dir = RunDir(run)
    logged = []
    _time_exports(run_dir, Manifest.load(run_dir.manifest_path), ["onnx", "aoti"], logged.append)
    exports = Manifest.load(run_dir.manifest_path).exports
    (onnx_timing,), (aoti_timing,) = exports["onnx"].timings, exports["aoti"].timings
    assert (onnx_timing.batch, aoti_timing.batch) == (8, 4)
    assert [line.split(":")[0] for line in logged] == ["timed onnxruntime on cpu",
                                                       "timed aoti on cpu"]
    faster, slower = sorted([("onnxruntime", onnx_timing), ("aoti", aoti_timing)],
                            key=lambda pair: pair[1].ms_per_image)
    backend, skipped = pick_backend(run)
    assert backend == faster[0]
    assert f"{slower[0]} on cpu: {slower[1].median_ms:.2f} ms at batch {slower[1].batch} here; " \
           f"{faster[0]} on cpu took" in skipped[-1]
