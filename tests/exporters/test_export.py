"""An export that fails parity is kept aside with its report, and the good one stays served."""

import json

import torch

from mmdeploy.models.base import AdaptedModel


def test_failed_parity_is_kept_aside_and_nothing_else_changes(run_copy, cli, expect_error,
                                                              digest, monkeypatch):
    export_dir = run_copy / "export"
    before = digest(export_dir)
    real_to_deploy = AdaptedModel.to_deploy

    def broken_to_deploy(self):  # an exporter bug: the deploy form drifts from the model
        deployed = real_to_deploy(self)
        with torch.no_grad():
            deployed.logit_scale += 0.05
        return deployed

    monkeypatch.setattr(AdaptedModel, "to_deploy", broken_to_deploy)
    result = cli(["export", "--run", str(run_copy), "--format", "onnx"])
    expect_error(result, "onnxruntime failed parity", "max_abs")

    assert (export_dir / "model.onnx.failed").is_file()
    report = json.loads((export_dir / "model.onnx.failed.json").read_text())
    assert report["passed"] is False and report["backend"] == "onnxruntime"
    assert report["worst"]["max_abs"] > 1e-4
    after = digest(export_dir)
    for name in ("model.onnx", "manifest.json"):  # the verified export is untouched
        assert after[name] == before[name]
    assert not (export_dir / ".staging").exists()

    monkeypatch.undo()
    assert cli(["verify", str(run_copy)]).code == 0  # and still serves and verifies
