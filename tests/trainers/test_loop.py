"""The training loop on the tiny backbone: metrics, best-on-validation, NaN guard, seeding."""

import json

import pytest
import torch

from mmdeploy.artifacts import RunDir, load_safetensors
from mmdeploy.backbone import load_backbone
from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.errors import MmdeployError
from mmdeploy.runs import RunConfig
from mmdeploy.trainers import loop


@pytest.fixture
def setup(tmp_path):
    def make(adapter="linear-probe", **train_options):
        backbone_config = BackboneConfig(cache_dir=str(tmp_path / "cache"))
        backbone = load_backbone(backbone_config)
        data = DataConfig(shots=2, val_per_class=3, test_per_class=3)
        splits = data.splits()
        run = RunConfig(adapter=adapter, adapter_config={}, backbone=backbone_config,
                        backbone_identity=backbone.identity, data=data,
                        train=TrainConfig(**{"epochs": 3, "batch_size": 8, **train_options}),
                        class_names=splits.class_names)
        run_dir = RunDir(tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
        run_dir.prepare_new(overwrite=False)
        return run, run_dir, backbone, splits

    return make


def records(run_dir):
    return [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()]


def test_metrics_validation_and_best_selection(setup):
    run, run_dir, backbone, splits = setup()
    result = loop.train(run, run_dir, backbone, splits)
    lines = records(run_dir)
    steps = [r for r in lines if "loss" in r]
    vals = [r for r in lines if r.get("event") == "val"]
    assert len(steps) == result.steps == 3 * 3  # 20 images / batch 8 = 3 steps, 3 epochs
    assert [v["epoch"] for v in vals] == [0, 1, 2]
    assert result.best_val_accuracy == max(v["val_accuracy"] for v in vals)
    best = max(vals, key=lambda v: (v["val_accuracy"], -v["val_loss"]))  # first on a full tie
    assert result.best_step == best["step"]
    assert lines[-1]["event"] == "test" and lines[-1]["best_step"] == result.best_step
    assert set(load_safetensors(run_dir.weights_path)) == {"classifier.weight",
                                                           "classifier.bias"}


def test_a_tie_on_validation_accuracy_goes_to_the_lower_loss():
    state = {"best_val": 1.0, "best_step": 100, "best_val_loss": 0.02}
    assert loop._better(1.0, 0.01, state)
    assert not loop._better(1.0, 0.03, state) and not loop._better(0.99, 0.001, state)
    assert loop._better(1.0, 0.5, {"best_val": 0.9, "best_step": 1, "best_val_loss": 0.1})
    # a checkpoint written before the loss was kept: accuracy alone decides, as it did
    assert not loop._better(1.0, 0.01, {"best_val": 1.0, "best_step": 100})
    assert not loop._better(1.0, float("nan"), state)


def test_same_seed_same_weights(setup):
    first = setup(seed=5)
    second = setup(seed=5)
    loop.train(*first)
    loop.train(*second)
    a, b = (load_safetensors(s[1].weights_path) for s in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_stops_a_diverging_run(setup, monkeypatch):
    run, run_dir, backbone, splits = setup(max_nan_steps=2)
    real_cross_entropy = loop.F.cross_entropy
    monkeypatch.setattr(loop.F, "cross_entropy",
                        lambda *a, **k: real_cross_entropy(*a, **k) * float("nan"))
    with pytest.raises(MmdeployError, match="non-finite losses"):
        loop.train(run, run_dir, backbone, splits)
    assert len([r for r in records(run_dir) if "loss" in r]) == 2  # skipped, logged, stopped


def test_zero_shot_trains_nothing_and_is_still_a_run(setup):
    run, run_dir, backbone, splits = setup(adapter="zero-shot")
    result = loop.train(run, run_dir, backbone, splits)
    assert result.steps == 0 and result.parameters["trainable"] == 0
    assert load_safetensors(run_dir.weights_path) == {}
    assert [r["event"] for r in records(run_dir)] == ["val", "test"]
