"""`mmdeploy export --shared`: one trunk, a branch per run, each verified through the trunk
(`exporters.shared`), on tiny runs of four adapters sharing the tiny backbone."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmdeploy.artifacts import Manifest
from mmdeploy.backbone import torch_device
from mmdeploy.errors import ConfigError
from mmdeploy.exporters import shared

STEPS = 5


def _train(cli, out: Path, adapter: str, *options: str) -> Path:
    result = cli(["train", "--adapter", adapter, "--out", out, "--max-steps", STEPS,
                  "--shots", 4, *options])
    assert result.code == 0, str(result)
    return out


@pytest.fixture(scope="module")
def runs(cli, ganet_run, tmp_path_factory) -> dict[str, Path]:
    """HMMoE on the last 2 of the 4 blocks, GA-Net, linear probe and zero-shot. Read-only."""
    folder = tmp_path_factory.mktemp("shared-runs")
    return {"hmmoe": _train(cli, folder / "hmmoe", "hmmoe", "--option", "num_layers=2"),
            "ganet": ganet_run,
            "probe": _train(cli, folder / "probe", "linear-probe"),
            "zero-shot": _train(cli, folder / "zero-shot", "zero-shot")}


def test_each_run_passes_parity_through_one_trunk(cli, runs, tmp_path):
    out = tmp_path / "shared"
    result = cli(["export", "--shared", *runs.values(), "--out", out, "--batch-range", "1,4,8"])
    assert result.code == 0, str(result)
    assert "trunk: tokens entering block 2" in result.stdout
    manifest = Manifest.load(out / "manifest.json")
    manifest.verify_files(out)  # every file with its sha256 and size
    trunk = manifest.exports["onnx:trunk"]
    assert trunk.details["block"] == 2 and trunk.passed
    assert sorted(trunk.check["verified_through"]) == sorted(p.name for p in runs.values())
    assert trunk.outputs == [{"name": "trunk_features", "dtype": "float32",
                              "shape": ["batch", 17, 64]}]
    for path in runs.values():
        record = manifest.exports[f"onnx:branch:{path.name}"]
        assert record.passed and record.backend == "onnxruntime"
        assert [o["name"] for o in record.outputs] == ["logits", "embeddings"]
        assert record.inputs[0]["name"] == "trunk_features"
        checks = {(c["inputs"], c["batch"]) for c in record.check["checks"]}
        assert checks == {(kind, batch) for kind in ("random", "real") for batch in (1, 7, 8)}
        assert record.check["worst"]["max_abs"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "trunk.onnx", *(f"branch-{p.name}.onnx" for p in runs.values())])


def _break_branches(monkeypatch, adapters: tuple[str, ...]) -> None:
    """Branches of these adapter classes export something their model does not compute."""
    real_branch = shared.as_branch

    def broken(model, block):
        branch = real_branch(model, block)
        if type(model).__name__ in adapters:
            with torch.no_grad():
                if hasattr(branch, "classifier"):
                    branch.classifier.bias.add_(1.0)
                else:
                    branch.logit_scale.add_(1.0)
        return branch

    monkeypatch.setattr(shared, "as_branch", broken)


def test_a_failing_branch_is_kept_aside(cli, runs, tmp_path, monkeypatch):
    _break_branches(monkeypatch, ("LinearProbeModel",))
    out = tmp_path / "shared"
    result = cli(["export", "--shared", runs["probe"], runs["zero-shot"], "--out", out,
                  "--batch-range", "1,2,2"])
    assert result.code == 1 and "onnxruntime failed parity" in result.error_lines()[0]
    assert "trunk: pooled features" in result.stdout  # neither adapts inside the tower
    manifest = Manifest.load(out / "manifest.json")
    assert sorted(manifest.exports) == ["onnx:branch:zero-shot", "onnx:trunk"]
    assert (out / "branch-probe.onnx.failed").is_file()
    assert not json.loads((out / "branch-probe.onnx.failed.json").read_text())["passed"]
    assert not (out / "branch-probe.onnx").exists()
    # A run added later (a live server's POST /adapters): refused when it adapts a block
    # this pooled trunk runs frozen; else verified through the trunk and recorded.
    with pytest.raises(ConfigError, match="hmmoe adapts block 2, before this trunk's cut "
                                          "at block 4"):
        shared.add_to_shared(out, runs["hmmoe"], log=lambda line: None)
    assert shared.add_to_shared(out, runs["ganet"], log=lambda line: None) == "ganet"
    record = Manifest.load(out / "manifest.json").exports["onnx:branch:ganet"]
    assert record.passed and record.check["worst"]["max_abs"] <= 1e-4
    assert record.details["trunk"] == "trunk.onnx" and (out / "branch-ganet.onnx").is_file()


def test_an_earlier_export_stays_when_no_branch_passes(cli, runs, tmp_path, monkeypatch,
                                                       digest):
    args = ["export", "--shared", runs["probe"], runs["zero-shot"], "--out", tmp_path / "out",
            "--batch-range", "1,2,2"]
    assert cli(args).code == 0
    before = digest(tmp_path / "out")
    _break_branches(monkeypatch, ("LinearProbeModel", "ZeroShotModel"))
    assert cli(args).code == 1
    after = digest(tmp_path / "out")
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == [
        "branch-probe.onnx.failed", "branch-probe.onnx.failed.json",
        "branch-zero-shot.onnx.failed", "branch-zero-shot.onnx.failed.json",
        "trunk.onnx.failed", "trunk.onnx.failed.json"]


def test_another_backbone_is_refused_before_loading(cli, runs, tmp_path, expect_error):
    other = Path(shutil.copytree(runs["probe"], tmp_path / "other"))
    config = json.loads((other / "adapter_config.json").read_text())
    config["backbone_identity"] = {"config_sha256": "0" * 64, "weights_sha256": "1" * 64}
    (other / "adapter_config.json").write_text(json.dumps(config))
    result = cli(["export", "--shared", runs["zero-shot"], other, "--out", tmp_path / "out"])
    expect_error(result, str(other), str(runs["zero-shot"]), "different backbones")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--shared", "RUN1", "--out", "DIR"], "two or more runs"),
    (["--shared", "RUN1", "RUN2"], "--out DIR"),
    (["--shared", "RUN1", "RUN2", "--run", "RUN3", "--out", "DIR"], "not --run"),
    (["RUN1", "RUN2"], "--shared RUN1 RUN2"),
])
def test_bad_shared_invocations_are_one_line(cli, expect_error, runs, args, fragment):
    names = {"RUN1": runs["probe"], "RUN2": runs["zero-shot"], "RUN3": runs["probe"]}
    result = cli(["export", *(names.get(a, a) for a in args)])
    expect_error(result, fragment)


def test_fp16_is_refused(cli, expect_error, runs, tmp_path):
    result = cli(["export", "--shared", runs["probe"], runs["zero-shot"], "--out", tmp_path,
                  "--fp16"])
    expect_error(result, "FP32 trunk and branches", "--fp16")


def test_aoti_trunk_and_branches_pass_parity(cli, runs, tmp_path):
    """Kept to a pooled trunk and two branches: AOTInductor compiles C++ for each (slow on
    2 CPU cores)."""
    pytest.importorskip("torch._inductor")
    out = tmp_path / "shared"
    result = cli(["export", "--shared", runs["probe"], runs["zero-shot"], "--out", out,
                  "--format", "aoti", "--batch-range", "1,2,3"])
    assert result.code == 0, str(result)
    manifest = Manifest.load(out / "manifest.json")
    manifest.verify_files(out)
    assert sorted(manifest.exports) == ["aoti:branch:probe", "aoti:branch:zero-shot",
                                        "aoti:trunk"]
    for record in manifest.exports.values():
        assert record.passed and record.backend == "aoti" and record.device == torch_device()
    assert manifest.exports["aoti:trunk"].outputs == [
        {"name": "trunk_features", "dtype": "float32", "shape": ["batch", 64]}]
    assert manifest.exports["aoti:branch:probe"].check["worst"]["max_abs"] <= 1e-4
