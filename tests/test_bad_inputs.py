"""Bad input through the command line: one clear `error: ...` line, a non-zero exit, no
traceback, and nothing half-written (no partial output, run and earlier export untouched).

Undecodable images are the exception by design (DESIGN section 7): each gives an error row
and the run goes on. Destructive cases work on a copy of the session run (`run_copy`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WEIGHTS = "adapter_model.safetensors"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def noise_image(path: Path, size=(48, 40), mode="RGB") -> Path:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, quality=95)
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def edit_config(run: Path, change) -> None:
    path = run / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


# ------------------------------------------------------------------------------- error rows


def test_undecodable_files_become_error_rows_and_the_run_goes_on(cli, tiny_run, tmp_path):
    folder = tmp_path / "in"
    noise_image(folder / "a-good.png")
    (folder / "b-notes.png").write_text("these are notes, not a picture\n")
    (folder / "c-readme.txt").write_text("plain text\n")
    truncate(noise_image(folder / "d-cut.png", size=(96, 96)))
    truncate(noise_image(folder / "e-cut.jpg", size=(96, 96)))
    noise_image(folder / "f-good.jpg", mode="L")
    out = tmp_path / "rows.jsonl"

    for backend in ("torch", "onnxruntime"):
        result = cli(["infer", tiny_run, folder, "-o", out, "--backend", backend,
                      "--overwrite"])
        assert result.code == 0, str(result)
        assert "6 rows written (4 errors, 0 already done)" in result.stdout
        assert "Traceback" not in result.output
        rows = {Path(r["path"]).name: r for r in rows_of(out)}
        assert sorted(rows) == ["a-good.png", "b-notes.png", "c-readme.txt", "d-cut.png",
                                "e-cut.jpg", "f-good.jpg"]
        expected_errors = {
            "b-notes.png": "not an image",
            "c-readme.txt": "not an image",
            "d-cut.png": "truncated image",
            "e-cut.jpg": "truncated image",
        }
        for name, message in expected_errors.items():
            row = rows[name]
            assert row["error"].startswith(f"{folder / name}: {message}"), row
            assert "\n" not in row["error"]
            assert row["label"] is None and row["score"] is None and row["topk"] == []
        for name in ("a-good.png", "f-good.jpg"):
            assert rows[name]["error"] is None and rows[name]["label"] is not None


def test_error_rows_in_csv(cli, tiny_run, tmp_path):
    import csv

    folder = tmp_path / "in"
    noise_image(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "rows.csv"
    result = cli(["infer", tiny_run, folder, "-o", out])
    assert result.code == 0, str(result)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.read_text().splitlines())}
    assert rows["bad.jpg"]["error"].startswith(f"{folder / 'bad.jpg'}: ")
    assert rows["bad.jpg"]["label"] == "" and json.loads(rows["bad.jpg"]["topk"]) == []
    assert rows["good.png"]["error"] == "" and rows["good.png"]["label"] != ""


# ------------------------------------------------------------------------------- inputs, outputs


def test_empty_folder(cli, expect_error, tiny_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "preds.jsonl"
    result = cli(["infer", tiny_run, empty, "-o", out])
    expect_error(result, "no input files", str(empty))
    assert not out.exists()


def test_missing_input_path(cli, expect_error, tiny_run, tmp_path):
    out = tmp_path / "preds.jsonl"
    result = cli(["infer", tiny_run, tmp_path / "nowhere", "-o", out])
    expect_error(result, "no input files", "nowhere")
    assert not out.exists()


def test_existing_output_is_refused_without_overwrite(cli, expect_error, tiny_run, tmp_path):
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "preds.jsonl"
    out.write_text("precious\n")
    result = cli(["infer", tiny_run, folder, "-o", out])
    expect_error(result, str(out), "already exists", "--overwrite")
    assert out.read_text() == "precious\n"


def test_output_with_an_unknown_extension(cli, expect_error, tiny_run, tmp_path):
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "preds.txt"
    result = cli(["infer", tiny_run, folder, "-o", out])
    expect_error(result, ".jsonl or .csv")
    assert not out.exists()


def test_output_in_a_missing_folder(cli, expect_error, tiny_run, tmp_path):
    """Bug: `open()` of the output raised FileNotFoundError with a traceback. Now the folder
    is not created and the one error line names it."""
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "no" / "such" / "folder" / "preds.jsonl"
    result = cli(["infer", tiny_run, folder, "-o", out])
    expect_error(result, f"{out}: folder {out.parent} does not exist")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("option", ["--batch-size", "--top-k"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_infer_refuses_non_positive_sizes(cli, tiny_run, tmp_path, option, value):
    """Bug: --batch-size 0 crashed with a traceback; --batch-size -1 reported rows it never
    wrote; --top-k 0 / -1 silently gave an empty or truncated top-k. Now a usage error."""
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "preds.jsonl"
    result = cli(["infer", tiny_run, folder, "-o", out, option, value])
    assert result.code == 2, str(result)  # click's usage error, before anything is loaded
    assert f"Error: Invalid value for '{option}': {value} is not in the range x>=1." in \
        result.stderr.splitlines()
    assert "Traceback" not in result.output
    assert not out.exists()


# ------------------------------------------------------------------------------- run files


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_adapter_weights(cli, expect_error, run_copy, tmp_path, digest, damage):
    weights = run_copy / WEIGHTS
    if damage == "missing":
        weights.unlink()
    else:
        truncate(weights, 0.6)
    before = digest(run_copy)
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "preds.jsonl"

    line = expect_error(cli(["infer", run_copy, folder, "-o", out, "--backend", "torch"]),
                        str(weights), damage)
    assert not out.exists(), line
    expect_error(cli(["verify", run_copy]), str(weights), damage)
    expect_error(cli(["export", "--run", run_copy, "--format", "onnx"]), str(weights), damage)
    assert digest(run_copy) == before  # the earlier export is untouched
    assert not (run_copy / "export" / ".staging").exists()


def test_tampered_adapter_weights(cli, expect_error, run_copy, tmp_path):
    """Same size, one bit flipped in the tensor data: only the recorded sha256 can tell."""
    weights = run_copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "preds.jsonl"
    expect_error(cli(["infer", run_copy, folder, "-o", out, "--backend", "torch"]),
                 str(weights), "sha256 mismatch")
    expect_error(cli(["export", "--run", run_copy]), str(weights), "sha256 mismatch")
    assert not out.exists()


def test_adapter_weights_from_another_adapter(cli, expect_error, run_copy, tmp_path):
    """A weights file copied over from another run is named, not loaded by accident."""
    other = tmp_path / "lora"
    assert cli(["train", "--adapter", "lora", "--out", other, "--max-steps", "1",
                "--shots", "1"]).code == 0
    (run_copy / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    expect_error(cli(["export", "--run", run_copy]), str(run_copy / WEIGHTS),
                 "holds LoRAModel weights", "'hmmoe' run")


def test_onnx_hash_mismatch(cli, expect_error, run_copy, tmp_path, digest):
    onnx_file = run_copy / "export" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    before = digest(run_copy)
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "preds.jsonl"

    result = cli(["infer", run_copy, folder, "-o", out, "--backend", "onnxruntime"])
    expect_error(result, str(onnx_file), "sha256 mismatch")
    assert not out.exists()
    expect_error(cli(["verify", run_copy]), str(onnx_file), "sha256 mismatch")
    assert digest(run_copy) == before


def test_onnx_file_missing(cli, expect_error, run_copy, tmp_path):
    onnx_file = run_copy / "export" / "model.onnx"
    onnx_file.unlink()
    expect_error(cli(["verify", run_copy]), str(onnx_file), "missing")


def test_not_a_run_directory(cli, expect_error, tmp_path):
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "preds.jsonl"
    expect_error(cli(["infer", tmp_path / "nope", folder, "-o", out, "--backend", "torch"]),
                 "no such run directory")
    expect_error(cli(["info", folder]), "not a run directory", "adapter_config.json")
    expect_error(cli(["verify", folder]), "manifest.json", "missing")
    assert not out.exists()


def test_corrupt_adapter_config(cli, expect_error, run_copy):
    (run_copy / "adapter_config.json").write_text('{"adapter": "hmmoe", ')
    expect_error(cli(["info", run_copy]), "adapter_config.json", "not valid JSON")


@pytest.mark.parametrize("edit", ["identity", "tiny_seed"])
def test_adapter_on_a_different_backbone(cli, expect_error, run_copy, tmp_path, digest, edit):
    def change(config):
        if edit == "identity":
            config["backbone_identity"]["weights_sha256"] = "0" * 64
        else:
            config["backbone"]["tiny_seed"] = 1

    edit_config(run_copy, change)
    before = digest(run_copy)
    folder = tmp_path / "in"
    noise_image(folder / "x.png")
    out = tmp_path / "preds.jsonl"
    line = expect_error(cli(["infer", run_copy, folder, "-o", out, "--backend", "torch"]),
                        "trained on backbone")
    assert "'tiny'" in line
    assert not out.exists()
    expect_error(cli(["export", "--run", run_copy]), "trained on backbone")
    assert digest(run_copy) == before


# ------------------------------------------------------------------------------- train options


def test_unknown_adapter_is_a_usage_error(cli, tmp_path):
    out = tmp_path / "run"
    for args in (["train", "--adapter", "nope", "--out", out],
                 ["export", "--adapter", "nope", "--run", out],
                 ["options", "nope"]):
        result = cli(args)
        assert result.code == 2, str(result)
        assert "Invalid value for" in result.stderr and "'nope' is not one of" in result.stderr
        assert "hmmoe" in result.stderr
        assert "Traceback" not in result.output
    assert not out.exists()


def test_train_refuses_an_existing_run(cli, expect_error, tiny_run, digest):
    before = digest(tiny_run)
    result = cli(["train", "--adapter", "hmmoe", "--out", tiny_run, "--max-steps", "1"])
    expect_error(result, str(tiny_run), "already exists", "--overwrite")
    assert digest(tiny_run) == before


def test_train_overwrite_refuses_a_folder_that_is_not_a_run(cli, expect_error, tmp_path,
                                                           digest):
    folder = tmp_path / "important"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work\n")
    before = digest(folder)
    result = cli(["train", "--adapter", "hmmoe", "--out", folder, "--max-steps", "1",
                  "--overwrite"])
    expect_error(result, "not a run directory", "refusing")
    assert digest(folder) == before


@pytest.mark.parametrize(("option", "fragments"), [
    ("colour=blue", ["'colour=blue'", "KEY one of", "rank", "top_k"]),
    ("rank", ["'rank'", "KEY=VALUE"]),
    ("rank=abc", ["rank='abc'", "not a valid int"]),
    ("scale=big", ["scale='big'", "not a valid float"]),
    ("top_k=9", ["top_k = 9", "between 1 and"]),
    ("rank=0", ["rank = 0", ">= 1"]),
    ("experts=bottleneck,telepathy", ["unknown expert 'telepathy'"]),
    ("router=galaxy", ["router = 'galaxy'"]),
])
def test_bad_adapter_option(cli, expect_error, tmp_path, option, fragments):
    out = tmp_path / "run"
    result = cli(["train", "--adapter", "hmmoe", "--out", out, "--max-steps", "1",
                  "--option", option])
    expect_error(result, *fragments)
    assert not out.exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--shots", "-1"], "shots"),
    (["--max-steps", "0"], "max-steps"),
    (["--batch-size", "0"], "batch-size"),
    (["--epochs", "0"], "epochs"),
])
def test_bad_train_numbers_leave_no_half_made_run(cli, tmp_path, args, fragment):
    """Bug: these are accepted by the CLI, the run directory and its adapter_config.json are
    written, and only then does training fail (--shots -1), fail to find the weights it never
    wrote (--max-steps 0, --epochs 0?), or crash with ZeroDivisionError (--batch-size 0): a
    half-made run that blocks the next `train --out`."""
    out = tmp_path / "run"
    result = cli(["train", "--adapter", "hmmoe", "--out", out, *args])
    assert result.code != 0, str(result)
    assert "Traceback" not in result.output
    assert fragment in result.stderr
    assert not out.exists(), f"half-made run left behind: {sorted(p.name for p in out.iterdir())}"


def test_bad_data_source(cli, expect_error, tmp_path):
    out = tmp_path / "run"
    result = cli(["train", "--adapter", "hmmoe", "--out", out, "--data", tmp_path / "nothing"])
    expect_error(result, "nothing", "no such file or folder")
    assert not out.exists()


# ------------------------------------------------------------------------------- export options


def test_unknown_export_format(cli, expect_error, run_copy, digest):
    before = digest(run_copy)
    result = cli(["export", "--adapter", "hmmoe", "--run", run_copy, "--format", "onnx,banana"])
    expect_error(result, "unknown export format(s) banana", "available: onnx")
    assert digest(run_copy) == before


def test_export_adapter_mismatch(cli, expect_error, run_copy, digest):
    before = digest(run_copy)
    result = cli(["export", "--adapter", "lora", "--run", run_copy])
    expect_error(result, str(run_copy), "'hmmoe'", "not 'lora'")
    assert digest(run_copy) == before


@pytest.mark.parametrize("batch_range", ["1,8", "8,4,16", "0,1,2", "a,b,c"])
def test_bad_batch_range(cli, run_copy, digest, batch_range):
    before = digest(run_copy)
    result = cli(["export", "--run", run_copy, "--batch-range", batch_range])
    assert result.code == 2, str(result)
    assert "MIN,OPT,MAX" in result.stderr
    assert "Traceback" not in result.output
    assert digest(run_copy) == before
