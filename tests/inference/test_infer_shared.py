"""Serving a shared export: `SharedPredictor` (one trunk pass, each branch on its own rows)
and `mmdeploy infer --shared DIR` (a row per image and run, resumable), on the session's
HMMoE and GA-Net runs exported together."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmdeploy.errors import ArtifactError, ConfigError, InputError
from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor
from mmdeploy.runtime.shared import SharedPredictor, WeightPool


@pytest.fixture(scope="module")
def inputs(image_dir, tmp_path_factory) -> Path:
    """Six real images and one file that is not an image."""
    folder = tmp_path_factory.mktemp("shared-inputs")
    images = sorted(p for p in image_dir.rglob("*") if p.is_file())
    for number, path in enumerate(images[:6]):
        shutil.copy(path, folder / f"{number}-{path.name}")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_a_mixed_batch_matches_each_run_alone_and_its_own_export(shared_dir, tiny_run,
                                                                  ganet_run):
    predictor = SharedPredictor(shared_dir)
    assert predictor.runs == sorted([tiny_run.name, ganet_run.name])  # the manifest's order
    pixels = np.random.default_rng(0).standard_normal(
        (7, 3, *predictor.preprocessor.image_size)).astype(np.float32)  # 7 > max batch 2
    adapters = [tiny_run.name, ganet_run.name, ganet_run.name, tiny_run.name, ganet_run.name,
                tiny_run.name, tiny_run.name]
    mixed = predictor.logits(pixels, list(enumerate(adapters)))
    for run in (tiny_run, ganet_run):
        mine = [i for i, adapter in enumerate(adapters) if adapter == run.name]
        alone = predictor.logits(pixels[mine], [(k, run.name) for k in range(len(mine))])
        np.testing.assert_allclose(np.stack([mixed[i] for i in mine]), np.stack(alone),
                                   rtol=0, atol=1e-6)
        own = OnnxRuntimePredictor(run).run_pixels(pixels[mine])["logits"]
        assert np.abs(np.stack(alone) - own).max() <= 1e-4  # DESIGN's ONNX Runtime FP32 bound
        assert (np.stack(alone).argmax(-1) == own.argmax(-1)).all()
        assert predictor.branches[run.name].class_names == OnnxRuntimePredictor(run).class_names


def test_unknown_adapters_and_tampered_files_are_refused(shared_dir, ganet_run, tmp_path):
    predictor = SharedPredictor(shared_dir, runs=[ganet_run.name])
    assert predictor.runs == [ganet_run.name]
    pixels = np.zeros((1, 3, *predictor.preprocessor.image_size), np.float32)
    with pytest.raises(InputError, match="no branch for adapter 'nope'"):
        predictor.predict_pixels(pixels, ["nope"])
    with pytest.raises(ConfigError, match="no onnx branch for run 'nope'"):
        SharedPredictor(shared_dir, runs=["nope"])
    tampered = Path(shutil.copytree(shared_dir, tmp_path / "tampered"))
    branch = tampered / f"branch-{ganet_run.name}.onnx"
    data = bytearray(branch.read_bytes())
    data[-1] ^= 1
    branch.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{branch.name}: sha256 mismatch"):
        SharedPredictor(tampered)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_infer_writes_a_row_per_image_and_run(cli, shared_dir, inputs, tiny_run, ganet_run,
                                              tmp_path):
    output = tmp_path / "rows.jsonl"
    result = cli(["infer", "--shared", shared_dir, inputs, "-o", output, "--batch-size", 3])
    assert result.code == 0, str(result)
    assert "14 rows written (2 errors" in result.stdout
    rows = _rows(output)
    runs = sorted([tiny_run.name, ganet_run.name])
    assert [(Path(r["path"]).name, r["run"]) for r in rows] == [
        (path.name, run) for path in sorted(inputs.iterdir()) for run in runs]
    assert [r["run"] for r in rows if r["error"]] == runs  # the broken file, once per run
    for run in (tiny_run, ganet_run):  # the run's own export agrees, row for row
        alone = tmp_path / f"{run.name}.jsonl"
        assert cli(["infer", run, inputs, "-o", alone]).code == 0
        own = _rows(alone)
        mine = [r for r in rows if r["run"] == run.name]
        assert [r["label"] for r in mine] == [r["label"] for r in own]
        assert all(r["score"] is None or abs(r["score"] - o["score"]) <= 1e-4
                   for r, o in zip(mine, own, strict=True))


def test_resume_after_a_torn_image_gives_the_uninterrupted_file(cli, shared_dir, inputs,
                                                                 tmp_path):
    """Batch 1: every image goes through the same computations in both runs, so the rows
    match byte for byte."""
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    args = ["infer", "--shared", shared_dir, inputs, "--batch-size", 1]
    assert cli([*args, "-o", full]).code == 0
    lines = full.read_bytes().splitlines(keepends=True)
    cut.write_bytes(b"".join(lines[:5]) + lines[5][:10])  # the third image's first row, torn
    result = cli([*args, "-o", cut, "--resume"])
    assert result.code == 0, str(result)
    assert "9 rows written (2 errors, 2 already done)" in result.stdout
    assert cut.read_bytes() == full.read_bytes()
    single = tmp_path / "single.jsonl"
    single.write_bytes(lines[0].replace(b'"run"', b'"not-run"'))
    result = cli([*args, "-o", single, "--resume"])
    assert result.code == 1 and "not a row written by `mmdeploy infer --shared`" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--runs", "nope"], "no onnx branch for run 'nope'"),
    (["--engine", "ray"], "--engine local"),
    (["--backend", "tensorrt"], "not 'tensorrt'"),
])
def test_bad_shared_invocations_are_one_line(cli, expect_error, shared_dir, inputs, tmp_path,
                                             args, fragment):
    result = cli(["infer", "--shared", shared_dir, inputs, "-o", tmp_path / "rows.jsonl",
                  *args])
    expect_error(result, fragment)


def test_branches_share_their_frozen_weights_by_content(shared_dir, tiny_run, ganet_run,
                                                        monkeypatch):
    """Both branches carry the tower's frozen blocks from the trunk's cut on: their sessions
    read one buffer for each weight whose bytes are equal, and answer as before."""
    monkeypatch.setattr(WeightPool, "MIN_BYTES", 4096)  # the tiny tower's matrices: 16-64 KB
    predictor = SharedPredictor(shared_dir)
    engines = {name: branch.engine for name, branch in predictor.branches.items()}
    values = {name: {id(value): value for _, value in engine._shared}
              for name, engine in engines.items()}
    common = values[tiny_run.name].keys() & values[ganet_run.name].keys()
    assert common  # the frozen blocks' matrices, once
    for value_id in common:  # each shared buffer holds equal bytes in both graphs
        arrays = [values[name][value_id].numpy() for name in values]
        assert np.array_equal(*arrays)
    assert len(predictor._weights) == len(values[tiny_run.name] | values[ganet_run.name])
    pixels = np.random.default_rng(1).standard_normal(
        (2, 3, *predictor.preprocessor.image_size)).astype(np.float32)
    for run in (tiny_run, ganet_run):
        shared = np.stack(predictor.logits(pixels, [(0, run.name), (1, run.name)]))
        own = OnnxRuntimePredictor(run).run_pixels(pixels)["logits"]
        assert np.abs(shared - own).max() <= 1e-4  # DESIGN's ONNX Runtime FP32 bound
        assert (shared.argmax(-1) == own.argmax(-1)).all()
    before = len(predictor._weights)
    predictor.remove_branch(ganet_run.name)
    del engines, values, arrays
    gc.collect()
    assert 0 < len(predictor._weights) < before  # what only GA-Net's branch held is freed
