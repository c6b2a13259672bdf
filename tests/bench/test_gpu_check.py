"""`benchmarks/gpu_check.py`: its dry run (`--dry-run`: the GPU check's own code on CPU at tiny
size) ends with every step accounted for (figures, or a skip / "not installed" reason), no
step errored and every parity check within DESIGN's tolerances; and its runner records an
error, a skip, a missing package, a spent budget and a cut without stopping.

Timings of the dry run are never bounds: CPU figures at tiny size say nothing about a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
DONE = {"ok", "skipped", "not_installed"}


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _positive(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run, as a user starts it: a subprocess, from another directory."""
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    elsewhere = tmp_path_factory.mktemp("cwd")
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                            cwd=elsewhere, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    data = json.loads((out / "gpu_check.json").read_text())
    return result, out, data, seconds


def test_dry_run_finishes_with_every_step_accounted_for(dry_run):
    result, out, data, seconds = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert data["status"] == "done" and data["dry_run"] is True
    assert data["settings"]["device"] == "cpu"
    assert list(data["steps"]) == gpu_check.STEP_NAMES
    assert data["summary"]["errors"] == {}
    for name, entry in data["steps"].items():
        assert entry["status"] in DONE, (name, entry)
        if entry["status"] == "ok":
            assert entry["figures"], name
        else:
            assert isinstance(entry["reason"], str) and entry["reason"], (name, entry)
        if entry["status"] == "not_installed":
            assert entry["reason"].startswith("not installed: "), entry
    log = (out / "gpu_check.log").read_text()
    for name in gpu_check.STEP_NAMES:
        assert name in log
    print(f"dry run: {seconds:.0f} s")  # shown with -s; the budget is a minute or two


def test_dry_run_parity_is_within_design_tolerances(dry_run):
    data = dry_run[2]
    summary = data["summary"]
    assert summary["parity_all_passed"] is True
    backends = {name: entry for name, entry in data["steps"].items()
                if (entry.get("figures") or {}).get("kind") == "backend"
                and entry["status"] == "ok"}
    for name, entry in backends.items():
        figures = entry["figures"]
        if (figures["backend"], figures["precision"]) == ("eager", "fp32"):
            assert "parity" not in figures  # the reference
            continue
        parity = figures["parity"]
        assert parity["passed"] is True, (name, parity)
        assert summary["parity"][name]["passed"] is True
        assert [c["batch"] for c in parity["checks"]] == [1, 1, 2, 2]  # random and real
        if figures["precision"] == "fp32":
            assert parity["criterion"]["max_abs"] == 1e-4
            assert parity["worst"]["max_abs"] <= 1e-4
        else:
            assert parity["criterion"]["min_cosine"] == 0.999
            assert parity["worst"]["min_cosine"] >= 0.999
    # the compiled and exported paths all ran here: AOTInductor FP32, torch.compile,
    # ONNX Runtime (CPU in a dry run), and the project's own export + verify
    for name in ("vitb16_hmmoe_aoti_fp32", "vitb16_hmmoe_compile_fp16",
                 "vitb16_hmmoe_eager_fp16", "vitb16_hmmoe_onnxruntime_fp32"):
        assert name in backends, name
    export = data["steps"]["tiny_hmmoe_export_verify"]["figures"]
    assert export["exports"] and all(e["passed"] for e in export["exports"].values())
    assert export["verify"] and all(v["passed"] for v in export["verify"])


def test_dry_run_resumes_to_the_same_weights(dry_run):
    data = dry_run[2]
    for adapter in ("hmmoe", "ganet"):
        figures = data["steps"][f"tiny_{adapter}_train_resume"]["figures"]
        assert figures["train"]["steps"] == data["settings"]["train_steps"]
        resume = figures["resume"]
        assert resume["interrupted_at_step"] == data["settings"]["resume_at"]
        assert resume["identical_weights"] and resume["identical_metrics"], resume
        assert "rng.torch" in resume["rng_states_in_checkpoint"]
        # the trainer autocasts on CUDA only: nothing ran under autocast on this CPU
        assert figures["train"]["autocast"]["forwards"] > 0
        assert figures["train"]["autocast"]["under_autocast"] == 0


def test_dry_run_times_every_backend_at_every_batch(dry_run):
    data = dry_run[2]
    assert all(_positive(v) for v in data["steps"]["matmul_peak"]["figures"]["gflops"].values())
    model = data["steps"]["vitb16_hmmoe_train"]["figures"]["model"]
    assert _positive(model["gflops_per_image"])
    for entry in data["steps"].values():
        figures = entry.get("figures") or {}
        if figures.get("kind") != "backend" or entry["status"] != "ok":
            continue
        assert [row["batch"] for row in figures["rows"]] == [1, 2]
        for row in figures["rows"]:
            assert _positive(row["host"]["median_ms"]) and _positive(row["host"]["images_per_s"])
            assert _positive(row["speedup_vs_eager_fp32"]["host"])
            assert _positive(row["achieved_tflops"]["host"])
            if figures["backend"] in ("eager", "compile", "aoti"):  # torch runs it
                assert _positive(row["device"]["median_ms"])
    targets = data["summary"]["targets"]
    assert {t["target"] for t in targets} == {"speedup", "peak_share"}
    assert all(_positive(t["value"]) and isinstance(t["met"], bool) for t in targets)
    assert data["summary"]["targets_meaningful"] is False


# ---------------------------------------------------------------------------- the runner


def _fail(check, figures):
    figures["before"] = 1
    raise ValueError("boom\nsecond line")


def _missing(check, figures):
    raise ModuleNotFoundError("No module named 'somepackage'", name="somepackage")


def _skip(check, figures):
    raise gpu_check.Skip("nothing to do here")


def _ok(check, figures):
    figures["value"] = 1.5
    check.write()  # a step may write partial figures at any time


def test_runner_records_each_outcome_and_goes_on(tmp_path):
    Step = gpu_check.Step
    steps = [Step("fails", _fail), Step("missing", _missing), Step("skips", _skip),
             Step("needs_failed", _ok, needs=("fails",)),
             Step("over_budget", _ok, min_s=1e9), Step("works", _ok),
             Step("dry_only", _ok, dry="left out in a dry run")]
    settings = gpu_check.settings_for(True, None, None)
    check = gpu_check.Check(tmp_path, tmp_path / "work", settings, steps)
    check.run(steps)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    entries = data["steps"]
    assert entries["fails"]["status"] == "error"
    assert entries["fails"]["error"] == "ValueError: boom"
    assert entries["fails"]["figures"] == {"before": 1}  # what it had is kept
    assert "second line" in "\n".join(entries["fails"]["traceback_tail"])
    assert entries["missing"]["status"] == "not_installed"
    assert entries["missing"]["reason"] == "not installed: somepackage"
    assert entries["skips"]["status"] == "skipped"
    assert entries["skips"]["reason"] == "nothing to do here"
    assert entries["needs_failed"]["reason"] == "needs fails, which is error"
    assert entries["over_budget"]["reason"].startswith("budget: ")
    assert entries["works"]["status"] == "ok" and entries["works"]["figures"] == {"value": 1.5}
    assert entries["dry_only"]["reason"] == "dry run: left out in a dry run"
    assert data["status"] == "done" and data["summary"]["errors"] == {"fails": "ValueError: boom"}
    assert "Traceback" in (tmp_path / "gpu_check.log").read_text()


def test_a_cut_run_leaves_its_figures_and_says_where_it_stopped(tmp_path):
    steps = [gpu_check.Step("first", _ok), gpu_check.Step("second", _ok),
             gpu_check.Step("third", _ok)]
    check = gpu_check.Check(tmp_path, tmp_path / "work", gpu_check.settings_for(
        True, None, None), steps)
    exits = []
    check.exit = exits.append
    check.run_step(steps[0])
    check.current = "second"
    check.steps["second"].update(status="running", started_s=0.0, figures={"partial": 2})
    check.cut("hard limit of 470 s")
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert exits == [3] and data["status"] == "cut"
    assert data["steps"]["first"]["figures"] == {"value": 1.5}
    assert data["steps"]["second"]["status"] == "cut"
    assert data["steps"]["second"]["figures"] == {"partial": 2}
    assert data["steps"]["third"]["reason"] == "not reached: hard limit of 470 s"


def test_gpu_settings_fit_the_machine_budget():
    settings = gpu_check.settings_for(False, None, None)
    assert settings.device == "cuda" and settings.batches == (1, 8, 64, 256)
    assert settings.target_batches == {"speedup": 64, "peak_share": 256}
    assert settings.deadline_s < settings.hard_limit_s < 8 * 60
    assert max(settings.parity_batches) == max(settings.batches)


def test_targets_are_read_at_their_batches():
    settings = gpu_check.settings_for(False, None, None)
    rows = [{"batch": 64, "speedup_vs_eager_fp32": {"host": 2.0, "device": 3.5},
             "peak_share": {"device": 0.2}},
            {"batch": 256, "speedup_vs_eager_fp32": {"device": 5.0},
             "peak_share": {"host": 0.3, "device": 0.45}}]
    steps = {"s": {"status": "ok", "figures": {"kind": "backend", "backend": "aoti",
                                               "precision": "fp16", "rows": rows}}}
    targets = gpu_check.summarize(steps, settings)["targets"]
    assert [(t["target"], t["batch"], t["basis"], t["value"], t["met"]) for t in targets] == [
        ("speedup", 64, "device", 3.5, True), ("peak_share", 256, "device", 0.45, True)]


def test_torch_peak_on_cpu():
    """torch's own matmul peak (`measure_torch_peak`, what the check reads shares against):
    positive figures for each precision, torch's FP32 matmul setting left as it was, and no
    TF32 on a CPU (a CUDA mode)."""
    import torch

    from mmdeploy.bench.peak import measure_torch_peak

    before = torch.get_float32_matmul_precision()
    peak = measure_torch_peak("cpu", size=64, iters=2)
    assert set(peak.gflops) == {"fp32", "bf16", "fp16"}
    assert all(_positive(v) for v in peak.gflops.values())
    assert peak.for_precision("fp32") == peak.gflops["fp32"] and peak.for_precision("int8") is None
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="TF32"):
        measure_torch_peak("cpu", size=64, iters=2, precisions=("tf32",))
