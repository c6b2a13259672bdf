"""Start or resume a training run: the glue between the CLI and the loop."""

from __future__ import annotations

from pathlib import Path

from mmdeploy.artifacts import RunDir, atomic_write_json, sha256_file
from mmdeploy.backbone import load_backbone
from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.data import load_labeled, make_splits
from mmdeploy.registry import adapter_class
from mmdeploy.runs import RunConfig, load_run_config

from .loop import TrainResult, train


def new_run(out: Path, adapter: str, adapter_options: dict, backbone_config: BackboneConfig,
            data_config: DataConfig, train_config: TrainConfig,
            overwrite: bool = False) -> tuple[RunDir, RunConfig]:
    """Create the run directory and its `adapter_config.json`; nothing trained yet."""
    config_cls = adapter_class(adapter).config_class
    adapter_config = config_cls.from_dict(adapter_options)
    backbone = load_backbone(backbone_config)
    data = load_labeled(data_config.source)
    d = data_config  # fail on an impossible split before anything is written
    make_splits(data, d.shots, d.val_per_class, d.test_per_class, d.split_seed)
    run_dir = RunDir(Path(out))
    run_dir.prepare_new(overwrite)
    run = RunConfig(adapter=adapter, adapter_config=adapter_config.to_dict(),
                    backbone=backbone_config, backbone_identity=backbone.identity,
                    data=data_config, train=train_config, class_names=data.class_names,
                    preprocessing=backbone.preprocessor.to_dict())
    atomic_write_json(run_dir.config_path, run.to_dict())
    return run_dir, run


def run_training(out: Path, resume: bool = False) -> tuple[RunConfig, TrainResult]:
    """Train the run in `out` (from its checkpoint with `resume`)."""
    run_dir = RunDir(Path(out))
    run = load_run_config(run_dir)
    backbone = load_backbone(run.backbone, expected_identity=run.backbone_identity)
    d = run.data
    splits = make_splits(load_labeled(d.source), d.shots, d.val_per_class, d.test_per_class,
                         d.split_seed)
    result = train(run, run_dir, backbone, splits, resume=resume)
    run.parameters = result.parameters
    run.weights_sha256 = sha256_file(run_dir.weights_path)
    atomic_write_json(run_dir.config_path, run.to_dict())
    return run, result
