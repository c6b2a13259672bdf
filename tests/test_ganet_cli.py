"""GA-Net through the same CLI as every adapter: train, export, verify, infer, bad banks."""

import json
import shutil

import pytest
import torch

from mmdeploy.artifacts import RunDir, load_safetensors, read_json
from mmdeploy.exporters.lint import lint_onnx


def labels_of(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["path"]: row["label"] for row in rows}


def test_the_adapter_itself_is_trained_and_exports_clean(ganet_run):
    weights = load_safetensors(RunDir(ganet_run).weights_path)
    assert weights["adapter.up.weight"].abs().sum() > 0  # starts at zero: gradients reached it
    run = read_json(RunDir(ganet_run).config_path)
    assert run["adapter_config"]["rank"] == 8
    assert run["bank_sha256"] is not None
    manifest = read_json(RunDir(ganet_run).manifest_path)
    assert all(manifest["exports"][name]["check"]["passed"] for name in ("onnx", "aoti"))
    assert manifest["deploy_form_max_abs"] < 1e-5
    # the graph part exports as TensorRT-friendly ops: TopK with a constant K, comparisons
    assert lint_onnx(RunDir(ganet_run).export_dir / "model.onnx") == []


def test_every_backend_gives_the_same_labels_on_real_images(cli, ganet_run, image_dir,
                                                            tmp_path):
    outputs = {}
    for backend in ("onnxruntime", "aoti", "torch"):
        outputs[backend] = tmp_path / f"{backend}.jsonl"
        result = cli(["infer", ganet_run, image_dir, "-o", outputs[backend], "--backend",
                      backend])
        assert result.code == 0, str(result)
    onnx_labels = labels_of(outputs["onnxruntime"])
    assert len(onnx_labels) == 20 and None not in onnx_labels.values()
    assert onnx_labels == labels_of(outputs["aoti"]) == labels_of(outputs["torch"])


def test_verify_passes(cli, ganet_run, tmp_path):
    run = shutil.copytree(ganet_run, tmp_path / "run")
    result = cli(["verify", run])
    assert result.code == 0, str(result)


@pytest.mark.parametrize("damage", ["missing", "tampered", "wrong shape"])
@pytest.mark.parametrize("command", ["infer", "export", "verify"])
def test_a_missing_or_tampered_bank_is_one_clear_line(cli, expect_error, ganet_run, image_dir,
                                                      tmp_path, damage, command):
    run = RunDir(shutil.copytree(ganet_run, tmp_path / "run"))
    if damage == "missing":
        run.bank_path.unlink()
    elif damage == "tampered":
        from safetensors.torch import save_file

        nodes = load_safetensors(run.bank_path)["nodes"]
        save_file({"nodes": nodes + 0.01}, run.bank_path)
    else:
        from safetensors.torch import save_file

        save_file({"nodes": torch.zeros(3, 7)}, run.bank_path)
        config = read_json(run.config_path)
        config["bank_sha256"] = None  # a hand-edited run: only the shape check is left
        run.config_path.write_text(json.dumps(config))
    args = {"infer": ["infer", run.root, image_dir, "-o", tmp_path / "out.jsonl", "--backend",
                      "torch"],
            "export": ["export", "--run", run.root],
            "verify": ["verify", run.root]}[command]
    fragment = {"missing": "missing", "tampered": "sha256 mismatch",
                "wrong shape": "expected"}[damage]
    expect_error(cli(args), "adapter_bank.safetensors", fragment)


def test_ganet_options_are_in_train_help(cli):
    result = cli(["train", "--help"])
    for option in ("k=5", "tau=0.4", "bank_size=256", "rank=512", "ewc_lambda=1.0"):
        assert option in result.stdout
