"""End to end through the command line: train -> export -> verify -> info -> infer.

One tiny HMMoE run per session (`tiny_run` in conftest.py) feeds every test here; the CLI
runs in-process through `mmdeploy.cli.main`, the console script's entry point.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmdeploy.rows import COLUMNS

COMMANDS = ["train", "export", "verify", "infer", "info", "options"]


# ------------------------------------------------------------------------------- helpers


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL or CSV output; CSV cells are decoded back to JSON types."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        lines = text.splitlines()
        rows = [json.loads(line) for line in lines]
        for row in rows:
            assert list(row) == COLUMNS, row
        return rows
    reader = csv.DictReader(text.splitlines())
    assert reader.fieldnames == COLUMNS
    rows = []
    for raw in reader:
        rows.append({
            "path": raw["path"],
            "label": raw["label"] or None,
            "score": float(raw["score"]) if raw["score"] else None,
            "topk": json.loads(raw["topk"]),
            "error": raw["error"] or None,
        })
    return rows


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def check_prediction(row: dict, classes: list[str], top_k: int = 5) -> None:
    """A good row: a known label whose score is the top of a descending top-k."""
    assert row["error"] is None, row
    assert row["label"] in classes
    assert len(row["topk"]) == min(top_k, len(classes))
    labels = [label for label, _ in row["topk"]]
    probs = [prob for _, prob in row["topk"]]
    assert len(set(labels)) == len(labels) and set(labels) <= set(classes)
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert row["topk"][0] == [row["label"], row["score"]]


def class_names(run: Path) -> list[str]:
    return json.loads((run / "adapter_config.json").read_text())["class_names"]


# ------------------------------------------------------------------------------- train + export


def test_train_writes_a_complete_run(tiny_run_build):
    run, train = tiny_run_build.path, tiny_run_build.train
    assert "20 steps in" in train.stdout and "hmmoe: best val accuracy" in train.stdout
    assert str(run) in train.stdout
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["adapter"] == "hmmoe"
    assert config["adapter_config"]["top_k"] == 2 and config["adapter_config"]["rank"] == 16
    assert config["backbone"]["spec"] == "tiny"
    assert len(config["class_names"]) == 10
    assert set(config["backbone_identity"]) == {"config_sha256", "weights_sha256"}
    assert 0 < config["parameters"]["trainable"] < config["parameters"]["backbone"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "event" not in m]
    assert steps == list(range(1, 21))
    assert any(m.get("event") == "val" for m in metrics)
    # safetensors only: no pickles anywhere in the run
    assert (run / "adapter_model.safetensors").stat().st_size > 0
    assert not [p for p in run.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin")]


def test_export_publishes_a_verified_onnx(tiny_run_build):
    run, export = tiny_run_build.path, tiny_run_build.export
    assert "onnxruntime fp32: passed parity" in export.stdout
    assert "exported model.onnx" in export.stdout
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and list(manifest["exports"]) == ["onnx"]
    record = manifest["exports"]["onnx"]
    onnx_file = run / "export" / "model.onnx"
    entry = record["files"]["model.onnx"]
    assert entry["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert entry["size"] == onnx_file.stat().st_size
    assert record["backend"] == "onnxruntime" and record["precision"] == "fp32"
    assert record["batch_range"] == {"min": 1, "opt": 8, "max": 32}
    assert record["opset"] == 18 and record["device"] is None
    assert [i["name"] for i in record["inputs"]] == ["pixel_values"]
    assert record["inputs"][0]["shape"][0] == "batch"
    assert {o["name"] for o in record["outputs"]} == {"logits", "embeddings"}
    assert record["versions"]["onnx"] and record["details"]["nodes"] > 0
    parity = record["check"]
    assert parity["kind"] == "parity" and parity["passed"] is True
    assert parity["worst"]["max_abs"] <= 1e-4
    assert parity["worst"]["top1_agreement"] == 1.0
    batches = {check["batch"] for check in parity["checks"]}
    assert batches == {1, 7, 32}
    assert {check["inputs"] for check in parity["checks"]} == {"random", "real"}
    # nothing left behind from staging or a failed attempt
    assert sorted(p.name for p in (run / "export").iterdir()) == ["manifest.json", "model.onnx"]


def test_verify_passes_and_changes_nothing(cli, tiny_run, digest):
    before = digest(tiny_run)
    result = cli(["verify", tiny_run])
    assert result.code == 0, str(result)
    assert "1 exported file(s) match their sha256" in result.stdout
    assert "onnxruntime fp32: passed" in result.stdout
    assert "all 1 exported backend(s) pass parity" in result.stdout
    assert digest(tiny_run) == before


def test_info_json(cli, tiny_run):
    result = cli(["info", tiny_run, "--json"])
    assert result.code == 0, str(result)
    details = json.loads(result.stdout)
    assert details["adapter"] == "hmmoe"
    assert details["classes"] == class_names(tiny_run)
    assert details["backbone"] == "tiny"
    assert details["trained"] is True
    assert details["adapter_config"]["top_k"] == 2
    assert details["exported_files"] == {
        "model.onnx": (tiny_run / "export" / "model.onnx").stat().st_size}
    onnx = details["exports"]["onnx"]
    assert onnx["backend"] == "onnxruntime" and onnx["precision"] == "fp32"
    assert onnx["check"] == "parity" and onnx["passed"] is True
    assert onnx["batch_range"] == "1..32" and onnx["max_abs"] <= 1e-4


def test_info_text(cli, tiny_run):
    result = cli(["info", tiny_run])
    assert result.code == 0, str(result)
    lines = result.stdout.splitlines()
    assert "adapter: hmmoe" in lines
    assert any(line.startswith("classes: ") and "zebra" in line for line in lines)


# ------------------------------------------------------------------------------- infer


def test_image_dir_is_varied(image_dir):
    """The inputs really are PNG and JPEG, grayscale and colour, of several sizes."""
    files = image_files(image_dir)
    suffixes, modes, sizes = set(), set(), set()
    for path in files:
        with Image.open(path) as image:
            suffixes.add(path.suffix)
            modes.add(image.mode)
            sizes.add(image.size)
    assert {".png", ".jpg"} <= suffixes
    assert {"L", "RGB"} <= modes
    assert len(sizes) >= 5


def test_infer_torch_and_onnxruntime_agree(cli, tiny_run, image_dir, tmp_path):
    torch_out, ort_out = tmp_path / "torch.jsonl", tmp_path / "ort.csv"
    torch_result = cli(["infer", tiny_run, image_dir, "-o", torch_out, "--backend", "torch"])
    assert torch_result.code == 0, str(torch_result)
    assert "backend: torch" in torch_result.stderr
    ort_result = cli(["infer", tiny_run, image_dir, "-o", ort_out, "--backend", "onnxruntime"])
    assert ort_result.code == 0, str(ort_result)
    assert "backend: onnxruntime" in ort_result.stderr

    files = [str(p) for p in image_files(image_dir)]
    classes = class_names(tiny_run)
    torch_rows, ort_rows = read_rows(torch_out), read_rows(ort_out)
    assert [r["path"] for r in torch_rows] == files
    assert [r["path"] for r in ort_rows] == files
    assert f"{len(files)} rows written (0 errors, 0 already done)" in torch_result.stdout
    for a, b in zip(torch_rows, ort_rows, strict=True):
        check_prediction(a, classes)
        check_prediction(b, classes)
        assert abs(a["score"] - b["score"]) <= 1e-4, (a, b)
        if a["label"] != b["label"]:  # only a genuine tie may flip between backends
            probs = dict(a["topk"])
            assert abs(probs[a["label"]] - probs.get(b["label"], 0.0)) <= 1e-5, (a, b)


def test_infer_default_backend_is_onnxruntime(cli, tiny_run, image_dir, tmp_path):
    out = tmp_path / "default.jsonl"
    result = cli(["infer", tiny_run, image_dir / "extra", "-o", out, "--top-k", "3"])
    assert result.code == 0, str(result)
    assert "backend: onnxruntime" in result.stderr
    rows = read_rows(out)
    assert len(rows) == 5
    for row in rows:
        check_prediction(row, class_names(tiny_run), top_k=3)


def test_infer_without_export_falls_back_to_torch_and_says_why(cli, run_copy, image_dir,
                                                                tmp_path):
    shutil.rmtree(run_copy / "export")
    out = tmp_path / "fallback.jsonl"
    result = cli(["infer", run_copy, image_dir / "extra", "-o", out])
    assert result.code == 0, str(result)
    assert "not using onnxruntime: the run has no export" in result.stderr
    assert "backend: torch" in result.stderr
    assert len(read_rows(out)) == 5


def test_a_run_exported_by_0_1_0_is_served_by_torch_until_re_exported(cli, run_copy, image_dir,
                                                                      tmp_path):
    """A 0.1.0 manifest (one batch range for every format) is refused in one line that says
    to re-export; PyTorch serves meanwhile, and `export` writes a format-2 manifest."""
    fixture = Path(__file__).parent / "fixtures" / "manifest-0.1.0.json"
    shutil.copy(fixture, run_copy / "export" / "manifest.json")
    result = cli(["infer", run_copy, image_dir / "extra", "-o", tmp_path / "old.jsonl"])
    assert result.code == 0, str(result)
    assert "backend: torch" in result.stderr
    assert "not using onnxruntime: " in result.stderr and "re-export the run" in result.stderr
    assert cli(["export", "--run", run_copy, "--format", "onnx"]).code == 0
    manifest = json.loads((run_copy / "export" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and set(manifest["exports"]) == {"onnx"}
    result = cli(["infer", run_copy, image_dir / "extra", "-o", tmp_path / "new.jsonl"])
    assert "backend: onnxruntime" in result.stderr


def test_infer_glob_and_single_file(cli, tiny_run, image_dir, tmp_path):
    out = tmp_path / "glob.jsonl"
    pattern = str(image_dir / "**" / "*.jpg")
    single = image_files(image_dir / "extra")[0]
    result = cli(["infer", tiny_run, pattern, single, "-o", out])
    assert result.code == 0, str(result)
    paths = [r["path"] for r in read_rows(out)]
    jpgs = sorted(str(p) for p in image_files(image_dir) if p.suffix == ".jpg")
    assert str(single) in jpgs  # listed twice (by the glob and by name): one row, not two
    assert paths == jpgs
    assert "1 duplicate skipped" in result.stdout


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_after_a_torn_write_gives_the_full_run(cli, tiny_run, image_dir, tmp_path,
                                                      suffix):
    full, partial = tmp_path / f"full{suffix}", tmp_path / f"partial{suffix}"
    result = cli(["infer", tiny_run, image_dir, "-o", full, "--batch-size", "4"])
    assert result.code == 0, str(result)
    full_rows = read_rows(full)
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    header = 1 if suffix == ".csv" else 0
    kept = lines[: header + 3]
    torn = lines[header + 3][: len(lines[header + 3]) // 2]
    partial.write_text("".join(kept) + torn, encoding="utf-8")

    result = cli(["infer", tiny_run, image_dir, "-o", partial, "--resume", "--batch-size", "4"])
    assert result.code == 0, str(result)
    assert f"{len(full_rows) - 3} rows written (0 errors, 3 already done)" in result.stdout
    resumed = read_rows(partial)
    paths = [r["path"] for r in resumed]
    assert len(paths) == len(set(paths)), "duplicate rows after --resume"
    assert paths == [r["path"] for r in full_rows]
    assert [r["label"] for r in resumed] == [r["label"] for r in full_rows]
    for a, b in zip(resumed, full_rows, strict=True):
        assert abs(a["score"] - b["score"]) <= 1e-5

    # resuming a finished output writes nothing and leaves it as it was
    finished = partial.read_bytes()
    result = cli(["infer", tiny_run, image_dir, "-o", partial, "--resume"])
    assert result.code == 0, str(result)
    assert f"0 rows written (0 errors, {len(full_rows)} already done)" in result.stdout
    assert partial.read_bytes() == finished


def test_overwrite_replaces_an_existing_output(cli, tiny_run, image_dir, tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text('{"path": "stale"}\n')
    result = cli(["infer", tiny_run, image_dir / "extra", "-o", out, "--overwrite"])
    assert result.code == 0, str(result)
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in image_files(image_dir / "extra")]


# ------------------------------------------------------------------------------- help, options


def test_top_level_help_lists_every_command(cli):
    result = cli(["--help"])
    assert result.code == 0, str(result)
    for command in COMMANDS:
        assert f"  {command}" in result.stdout
    assert "mmdeploy train  --adapter hmmoe" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example(cli, command):
    result = cli([command, "--help"])
    assert result.code == 0, str(result)
    usage = result.stdout.splitlines()[0]
    assert usage.startswith("Usage: ") and f"mmdeploy {command} [OPTIONS]" in usage
    assert "Example" in result.stdout, f"`mmdeploy {command} --help` shows no example"
    example = result.stdout.split("Example", 1)[1]
    assert f"mmdeploy {command} " in example


def test_version(cli):
    from mmdeploy import __version__

    result = cli(["--version"])
    assert result.code == 0, str(result)
    assert result.stdout.strip() == f"mmdeploy, version {__version__}"


def test_options_hmmoe_lists_its_options(cli):
    from mmdeploy.models.hmmoe.config import HMMoEConfig

    result = cli(["options", "hmmoe"])
    assert result.code == 0, str(result)
    pairs = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert pairs["rank"] == "16"
    assert pairs["top_k"] == "2"
    assert pairs["experts"] == "bottleneck,cross_attention,channel_attention,affine_fusion"
    assert list(pairs) == [f.name for f in dataclasses.fields(HMMoEConfig)]


# ------------------------------------------------------------------------------- dense HMMoE


def test_dense_hmmoe_exports_and_passes_parity(cli, tmp_path):
    run = tmp_path / "dense"
    result = cli(["train", "--adapter", "hmmoe", "--out", run, "--max-steps", "5", "--shots",
                  "1", "--option", "top_k=4"])
    assert result.code == 0, str(result)
    assert "5 steps" in result.stdout
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["adapter_config"]["top_k"] == 4 == len(config["adapter_config"]["experts"])

    result = cli(["export", "--adapter", "hmmoe", "--run", run, "--format", "onnx",
                  "--batch-range", "1,4,8"])
    assert result.code == 0, str(result)
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["exports"]["onnx"]["batch_range"] == {"min": 1, "opt": 4, "max": 8}
    parity = manifest["exports"]["onnx"]["check"]
    assert parity["passed"] is True and parity["worst"]["max_abs"] <= 1e-4
    assert {check["batch"] for check in parity["checks"]} == {1, 7, 8}

    result = cli(["verify", run])
    assert result.code == 0, str(result)
    assert "all 1 exported backend(s) pass parity" in result.stdout


@pytest.mark.parametrize("adapter", ["lora", "linear-probe"])
def test_baselines_share_the_export_path(adapter, tmp_path, cli):
    """LoRA is merged into the frozen weights before export; both pass the same parity gate."""
    run = tmp_path / adapter
    assert cli(["train", "--adapter", adapter, "--out", run, "--max-steps", "3",
                "--shots", "1"]).code == 0
    exported = cli(["export", "--run", run, "--batch-range", "1,4,9"])
    assert exported.code == 0, str(exported)
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    parity = manifest["exports"]["onnx"]["check"]
    assert parity["passed"] is True
    assert {c["batch"] for c in parity["checks"]} == {1, 7, 9}
