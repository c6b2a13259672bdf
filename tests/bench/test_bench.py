"""`mmdeploy bench` end to end on the tiny run: the results file's structure and that every
ratio is a positive number (never a speed bound: timings on a shared CPU say nothing); the
INT8 row with the gate's figures, and each row's share of the machine's matmul peak."""

import json
import math
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from mmdeploy.artifacts import ExportRecord, Manifest
from mmdeploy.bench.backends import bench_run, render_table, summary_lines, write_result

BACKENDS = ["eager", "onnxruntime", "aoti"]
TIMING_KEYS = {"median_ms", "p90_ms", "images_per_s", "peak_rss_mb", "cuda_peak_mb"}


def _positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_bench_writes_results_and_a_table(cli, aoti_run, tmp_path):
    out = tmp_path / "results" / "bench.json"
    result = cli(["bench", aoti_run, "--batch", "1,3", "--backends", ",".join(BACKENDS),
                  "--warmup", "1", "--iters", "3", "--out", out])
    assert result.code == 0, str(result)
    assert f"-> {out}" in result.stdout
    assert "x eager" in result.stdout and "adapter overhead" in result.stdout

    data = json.loads(out.read_text())
    assert data["adapter"] == "hmmoe" and data["backbone"] == "tiny"
    assert data["settings"] == {"batches": [1, 3], "warmup": 1, "iters": 3}
    assert data["image_size"] == [32, 32]
    assert {"cpu", "cores", "torch_threads", "gpu"} <= set(data["machine"])
    assert "torch" in data["versions"]
    rows = data["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [
        (b, n) for n in (1, 3) for b in BACKENDS]
    for row in rows:
        assert row["device"] == "cpu" and row["precision"] == "fp32"
        for model in ("adapted", "backbone"):
            timing = row[model]
            assert set(timing) == TIMING_KEYS
            assert _positive(timing["median_ms"]) and _positive(timing["images_per_s"])
            assert timing["p90_ms"] >= timing["median_ms"]
            assert timing["cuda_peak_mb"] is None
            assert _positive(timing["peak_rss_mb"])  # Linux: /proc/self/clear_refs resets it
        for ratio in ("speedup_vs_eager", "backbone_speedup_vs_eager", "adapted_over_backbone"):
            assert _positive(row[ratio]), (ratio, row)
        if row["backend"] == "eager":
            assert row["speedup_vs_eager"] == 1.0
    # the backbone's bench-only exports were checked against its eager run
    assert set(data["backbone_export_max_abs"]) == {"onnxruntime", "aoti"}
    assert all(v < 1e-4 for v in data["backbone_export_max_abs"].values())
    # the machine's peak, measured in the same run, and each row's share of it
    assert _positive(data["peak"]["fp32_gflops"]) and _positive(data["peak"]["int8_gops"])
    assert _positive(data["model_flops"]["total"]) and data["int8"] is None
    assert all(_positive(r["achieved_gflops"]) and _positive(r["peak_share"]) for r in rows)
    assert "peak: ONNX Runtime" in result.stdout and "GFLOP per image" in result.stdout


def test_bench_refuses_unknown_backends_and_bad_batches(cli, expect_error, tiny_run, tmp_path):
    expect_error(cli(["bench", tiny_run, "--backends", "eager,openvino"]),
                 "unknown bench backend(s) openvino")
    bad = cli(["bench", tiny_run, "--batch", "1,x"])
    assert bad.code == 2 and "comma-separated batch sizes" in bad.output


# ---------------------------------------------------------------------------- INT8 and peak


GATE = {"passed": True, "agreement": 0.996, "accuracy_drop_points": 0.25,
        "cosine_min": 0.9871, "cosine_mean": 0.9978, "images": 250, "labelled": 200}


@pytest.fixture(scope="module")
def int8_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the session run with a dynamic INT8 graph recorded as the INT8 export
    records it (the manifest's "int8" export, its file listed with its sha256); the gate's
    figures are made up: the bench shows them, it does not measure them."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("runs") / "hmmoe-int8"))
    export = run / "export"
    quantize_dynamic(export / "model.onnx", export / "model.int8.onnx",
                     op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    manifest = Manifest.load(export / "manifest.json")
    onnx = manifest.exports["onnx"]
    record = ExportRecord(backend="onnxruntime", precision="int8",
                          batch_range=dict(onnx.batch_range),
                          check={"kind": "gate", **GATE},
                          details={"method": "dynamic", "calibration": None,
                                   "kept_fp32": ["node_MatMul_19"],
                                   "excluded_from_start": ["node_linear_7", "node_matmul_8"],
                                   "quantize_seconds": 0.4})
    record.add_file(export, "model.int8.onnx")
    manifest.exports["int8"] = record
    manifest.save(export / "manifest.json")
    return run


def test_bench_int8_row_shows_the_gate_and_every_row_its_share_of_the_peak(int8_run,
                                                                           tmp_path):
    result = bench_run(int8_run, [1, 3], ["eager", "onnxruntime", "onnxruntime-int8"],
                       warmup=1, iters=3, log=lambda _: None, peak_size=128)
    assert result.skipped == {}
    rows = {(r.backend, r.batch): r for r in result.rows}
    assert list(rows) == [(b, n) for n in (1, 3)
                          for b in ("eager", "onnxruntime", "onnxruntime-int8")]
    peak, flops = result.peak, result.model_flops
    assert peak.size == 128 and _positive(peak.fp32_gflops) and _positive(peak.int8_gops)
    assert flops.unresolved == [] and _positive(flops.total)
    for row in result.rows:
        assert row.achieved_gflops == round(flops.total * row.adapted.images_per_s / 1e9, 2)
        best = peak.int8_gops if row.precision == "int8" else peak.fp32_gflops
        assert row.peak_share == round(row.achieved_gflops / best, 4)
        assert _positive(row.speedup_vs_eager)
        if row.backend == "onnxruntime-int8":
            assert (row.device, row.precision) == ("cpu", "int8")
            assert row.backbone is None and row.adapted_over_backbone is None
            assert row.backbone_speedup_vs_eager is None
        else:
            assert _positive(row.adapted_over_backbone)
    assert result.int8["gate"] == {"kind": "gate", **GATE} and result.int8["method"] == "dynamic"
    speedups = result.int8["speedup_vs_onnxruntime_fp32"]
    assert set(speedups) == {"1", "3"} and all(_positive(x) for x in speedups.values())
    assert speedups["3"] == round(rows["onnxruntime", 3].adapted.median_ms
                                  / rows["onnxruntime-int8", 3].adapted.median_ms, 4)

    lines = summary_lines(result)
    assert lines[0].startswith("peak: ONNX Runtime CPUExecutionProvider, 128-square")
    assert "GFLOP per image" in lines[1] and "not counted" in lines[1]
    assert lines[2].startswith("onnxruntime-int8: dynamic INT8 (model.int8.onnx), gate passed: "
                               "top-1 agreement 99.6%, accuracy drop 0.25 points, cosine min "
                               "0.9871, kept FP32: 1 by the gate's fallback + 2 from the start")
    console = Console(width=200, record=True)
    console.print(render_table(result))
    text = console.export_text()
    assert "onnxruntime-int8 cpu int8" in text and "% peak" in text and lines[2][:60] in text

    write_result(result, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["peak"]["int8_gops"] == peak.int8_gops
    assert data["model_flops"]["total"] == flops.total
    assert data["int8"]["gate"]["agreement"] == 0.996
    assert data["rows"][2]["backbone"] is None and _positive(data["rows"][2]["peak_share"])


def test_bench_skips_int8_without_a_verified_graph(tiny_run, int8_run, tmp_path):
    result = bench_run(tiny_run, [1], ["eager", "onnxruntime-int8"], warmup=0, iters=1,
                       log=lambda _: None, peak_size=0)
    assert "INT8" in result.skipped["onnxruntime-int8"]  # no INT8 export, said how to make one
    assert result.peak is None and result.int8 is None
    assert [r.backend for r in result.rows] == ["eager"]

    tampered = Path(shutil.copytree(int8_run, tmp_path / "tampered"))
    with open(tampered / "export" / "model.int8.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    result = bench_run(tampered, [1], ["eager", "onnxruntime-int8"], warmup=0, iters=1,
                       log=lambda _: None, peak_size=0)
    assert "model.int8.onnx: sha256 mismatch" in result.skipped["onnxruntime-int8"]
