"""`mmdeploy bench` end to end on the tiny run: the results file's structure and that every
ratio is a positive number (never a speed bound: timings on a shared CPU say nothing)."""

import json
import math

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
            assert timing["peak_rss_mb"] is None or _positive(timing["peak_rss_mb"])
        for ratio in ("speedup_vs_eager", "backbone_speedup_vs_eager", "adapted_over_backbone"):
            assert _positive(row[ratio]), (ratio, row)
        if row["backend"] == "eager":
            assert row["speedup_vs_eager"] == 1.0
    # the backbone's bench-only exports were checked against its eager run
    assert set(data["backbone_export_max_abs"]) == {"onnxruntime", "aoti"}
    assert all(v < 1e-4 for v in data["backbone_export_max_abs"].values())


def test_bench_refuses_unknown_backends_and_bad_batches(cli, expect_error, tiny_run, tmp_path):
    expect_error(cli(["bench", tiny_run, "--backends", "eager,openvino"]),
                 "unknown bench backend(s) openvino")
    bad = cli(["bench", tiny_run, "--batch", "1,x"])
    assert bad.code == 2 and "comma-separated batch sizes" in bad.output
