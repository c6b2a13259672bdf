"""`export --format triton`: a model repository that Triton's own schema accepts, that matches
the exported graph, and whose client gets `mmdeploy infer`'s rows. No Triton server runs on
these machines, so the repository is validated, not served."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="the [triton] extra (tritonclient[grpc]) is "
                    "not installed")

from mmdeploy.artifacts import ExportRecord, Manifest, RunDir  # noqa: E402
from mmdeploy.config import ExportConfig  # noqa: E402
from mmdeploy.errors import ArtifactError, ConfigError  # noqa: E402
from mmdeploy.exporters import formats, triton, triton_client  # noqa: E402
from mmdeploy.runtime.onnxruntime import OnnxSession  # noqa: E402
from mmdeploy.runtime.tensorrt import EngineSidecar, Profile  # noqa: E402


@pytest.fixture(scope="module")
def triton_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the session run under the same folder name (the repository records itself
    in the run's manifest)."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("triton-run") / tiny_run.name))


@pytest.fixture(scope="module")
def repository(triton_run, tmp_path_factory, cli) -> Path:
    """The session run's repository, written once through the CLI (read-only)."""
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    result = cli(["export", "--run", triton_run, "--format", "triton", "--out", out])
    assert result.code == 0, str(result)
    assert "validated" in result.stdout
    return out


@pytest.fixture
def editable(repository, tmp_path) -> Path:
    return Path(shutil.copytree(repository, tmp_path / "repo"))


def test_repository_layout_and_config_match_the_export(repository, tiny_run, triton_run):
    recorded = Manifest.load(RunDir(triton_run).manifest_path).exports["triton"]
    assert recorded.backend == "triton" and recorded.passed and recorded.files == {}
    assert recorded.details["repository"] == str(repository.resolve())
    assert recorded.batch_range == {"min": 1, "opt": 8, "max": 32}
    name = tiny_run.name
    assert triton.validate_repository(repository) == [name]
    assert {p.name for p in repository.iterdir()} == {name, "README.md", "client.py"}
    model = repository / name
    config = triton.parse_config(model / "config.pbtxt")  # Triton's own schema
    manifest = Manifest.load(RunDir(tiny_run).manifest_path)
    assert (model / "1" / "model.onnx").read_bytes() == \
        (RunDir(tiny_run).export_dir / "model.onnx").read_bytes()
    assert config.name == name and config.platform == "onnxruntime_onnx"
    onnx = manifest.exports["onnx"]
    assert config.max_batch_size == onnx.batch_range["max"] == 32
    (pixels,) = config.input
    (image,) = onnx.inputs
    assert pixels.name == image["name"] == "pixel_values"
    assert list(pixels.dims) == image["shape"][1:] == [3, 32, 32]
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {o["name"]: o["shape"][1:] for o in onnx.outputs}
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert [g.count for g in config.instance_group] == [1]
    run_config = json.loads((RunDir(tiny_run).config_path).read_text())
    assert (model / "labels.txt").read_text().splitlines() == run_config["class_names"]
    readme = (repository / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "client.py" in readme


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("old", "new", "fragment"), [
    ("dims: 3\n", "dims: 4\n", "'pixel_values' has dims [4, 32, 32]"),
    ('name: "pixel_values"', 'name: "images"', "input 'images' is not in the graph"),
    ('name: "logits"', 'name: "scores"', "output 'scores' is not in the graph"),
    ("dims: 10\n", "dims: 11\n", "'logits' has dims [11]"),
    ('platform: "onnxruntime_onnx"', 'platform: "pytorch_libtorch"', "platform"),
    ("data_type: TYPE_FP32", "data_type: TYPE_FP16", "is TYPE_FP16, the graph's is TYPE_FP32"),
    ("max_batch_size: 32", "max_batch_size: 64", "outside the export's batch range 1..32"),
    ("preferred_batch_size: 32", "preferred_batch_size: 48", "preferred_batch_size 48"),
    ("max_batch_size: 32", "max_batch_sise: 32", "not a valid Triton model config"),
])
def test_a_hand_broken_config_is_one_clear_error(editable, tiny_run, old, new, fragment):
    config = editable / tiny_run.name / "config.pbtxt"
    _edit(config, old, new)
    with pytest.raises(ConfigError) as caught:
        triton.validate_repository(editable)
    message = str(caught.value)
    assert fragment in message and str(config) in message and "\n" not in message


def test_a_config_naming_another_model_is_refused(editable, tiny_run):
    _edit(editable / tiny_run.name / "config.pbtxt", f'name: "{tiny_run.name}"', 'name: "x"')
    with pytest.raises(ConfigError, match="differs from its folder"):
        triton.validate_repository(editable)


def test_a_tampered_model_file_is_caught(editable, tiny_run):
    model = editable / tiny_run.name / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="model.onnx: sha256 differs"):
        triton.validate_repository(editable)


def test_an_empty_folder_is_not_a_repository(tmp_path):
    with pytest.raises(ArtifactError, match="no model folder"):
        triton.validate_repository(tmp_path)


def test_the_client_gets_the_rows_of_infer(repository, tiny_run, image_dir, tmp_path, cli):
    """client.py's preprocessing and request, with the repository's model run in ONNX
    Runtime where Triton would run it, give the rows `mmdeploy infer` writes."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths = sorted(str(p) for p in image_dir.rglob("*") if p.is_file()) + [str(broken)]
    expected_file = tmp_path / "rows.jsonl"
    result = cli(["infer", tiny_run, *paths, "-o", expected_file, "--backend", "onnxruntime"])
    assert result.code == 0, str(result)
    expected = {r["path"]: r for r in map(json.loads, expected_file.read_text().splitlines())}

    model_dir = triton_client.model_folder(None, repository)
    pixels, rows = triton_client.preprocess(model_dir, paths)
    inputs, outputs = triton_client.request(pixels)
    assert inputs[0].name() == "pixel_values" and inputs[0].shape() == list(pixels.shape)
    assert inputs[0].datatype() == "FP32" and outputs[0].name() == "logits"
    logits = OnnxSession(model_dir / "1" / "model.onnx")(pixels)["logits"]
    class_names = (model_dir / "labels.txt").read_text().splitlines()
    got = triton_client.rows_from_logits(paths, rows, logits, class_names)
    assert [r["path"] for r in got] == paths
    for row in got:
        want = expected[row["path"]]
        assert row["label"] == want["label"]
        assert (row["error"] is None) == (want["error"] is None)
        if row["error"] is None:
            assert row["score"] == pytest.approx(want["score"], abs=1e-5)
    assert expected[str(broken)]["error"] is not None


def test_a_tensorrt_engine_becomes_a_second_model(run_copy, tmp_path):
    """A verified engine is served as NAME_tensorrt (platform tensorrt_plan, GPU instances),
    checked against the ONNX graph it was built from; the plan itself is only copied."""
    run_dir = RunDir(run_copy)
    manifest = Manifest.load(run_dir.manifest_path)
    engine, sidecar = "model.gpu.fp16.engine", "model.gpu.fp16.engine.json"
    (run_dir.export_dir / engine).write_bytes(b"serialized engine bytes")
    EngineSidecar("10.13", "GPU", "9.0", Profile.for_batches(1, 8, 16, (32, 32)), "fp16",
                  manifest.files["model.onnx"]["sha256"]).save(run_dir.export_dir / sidecar)
    record = ExportRecord(backend="tensorrt", precision="fp16", device="cuda",
                          batch_range={"min": 1, "opt": 8, "max": 16},
                          check={"kind": "parity", "passed": True},
                          details={"engine": engine, "sidecar": sidecar})
    for name in (engine, sidecar):
        record.add_file(run_dir.export_dir, name)
    manifest.exports["tensorrt"] = record
    manifest.save(run_dir.manifest_path)

    out = triton.write_repository(run_copy, tmp_path / "repo", log=lambda _: None)
    name = f"{triton.repository_name(run_dir)}_tensorrt"
    assert triton.validate_repository(out) == sorted([run_dir.root.name, name])
    config = triton.parse_config(out / name / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert (out / name / "1" / "model.plan").read_bytes() == b"serialized engine bytes"
    kinds = [triton.model_config_pb2().ModelInstanceGroup.Kind.Name(g.kind)
             for g in config.instance_group]
    assert kinds == ["KIND_GPU"]
    _edit(out / name / "config.pbtxt", "KIND_GPU", "KIND_CPU")
    with pytest.raises(ConfigError, match="GPU instances only"):
        triton.validate_repository(out)


def test_a_batch_range_not_starting_at_one_is_refused(run_copy, tmp_path, cli, expect_error):
    manifest = Manifest.load(RunDir(run_copy).manifest_path)
    manifest.exports["onnx"].batch_range["min"] = 2
    manifest.save(RunDir(run_copy).manifest_path)
    result = cli(["export", "--run", run_copy, "--format", "triton", "--out", tmp_path / "r"])
    expect_error(result, "batch range starts at 2", "--batch-range 1,")
    assert not (tmp_path / "r").exists()


def test_a_rewrite_replaces_the_repository_whole(repository, tmp_path, triton_run):
    out = Path(shutil.copytree(repository, tmp_path / "repo"))
    (out / "stale.txt").write_text("from an earlier export")
    triton.write_repository(triton_run, out, log=lambda _: None)
    assert not (out / "stale.txt").exists()
    assert triton.validate_repository(out) == [triton_run.name]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no staging folder left


def test_triton_brings_in_the_onnx_export_it_needs():
    def plan(requested, has_onnx):
        made = formats.plan_export(ExportConfig(formats=requested), has_onnx, "cpu")
        return [fmt for fmt, _ in made.formats], made.triton

    assert plan(("onnx", "aoti"), True) == (["onnx", "aoti"], False)
    assert plan(("triton",), True) == ([], True)  # the run's verified graph is enough
    assert plan(("triton", "aoti"), False) == (["onnx", "aoti"], True)  # not exported yet


def test_without_the_extra_the_command_names_it(run_copy, tmp_path, cli, expect_error,
                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # import fails
    result = cli(["export", "--run", run_copy, "--format", "triton", "--out", tmp_path / "r"])
    expect_error(result, "pip install 'mm-peft-deploy[triton]'")
    assert not (tmp_path / "r").exists()


def test_the_client_pads_nothing_and_keeps_bad_files_as_rows(repository, tmp_path):
    model_dir = triton_client.model_folder(None, repository)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    pixels, rows = triton_client.preprocess(model_dir, [str(bad)])
    assert pixels.shape == (0, 3, 32, 32) and rows[0]["error"]
    got = triton_client.rows_from_logits([str(bad)], rows, np.zeros((0, 10), np.float32), [])
    assert got == rows
