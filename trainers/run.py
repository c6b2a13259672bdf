"""Start or resume a training run: the glue between the CLI and the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmdeploy.artifacts import RunDir, atomic_write_json, sha256_file
from mmdeploy.backbone import Backbone, load_backbone
from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.data import Splits, data_task
from mmdeploy.registry import adapter_class
from mmdeploy.runs import RunConfig, load_run_config

from .loop import TrainResult, train


@dataclass
class PreparedRun:
    """A run directory with its config, and the backbone and data it trains on; `notes`
    says which adapter defaults were fitted to the backbone."""

    run_dir: RunDir
    run: RunConfig
    backbone: Backbone
    splits: Splits
    notes: list[str] = field(default_factory=list)


def new_run(out: Path, adapter: str, adapter_options: dict, backbone_config: BackboneConfig,
            data_config: DataConfig, train_config: TrainConfig,
            overwrite: bool = False) -> PreparedRun:
    """Check everything, then create the run directory and its `adapter_config.json`.
    `adapter_options` are the options the user gave; the others take their defaults, fitted
    to the backbone (`AdaptedModel.fit_options`)."""
    task = data_task(data_config.source)  # the data chooses the task
    model_class = adapter_class(adapter, task)
    model_class.config_class.from_dict(adapter_options)  # a bad option fails first
    backbone = load_backbone(backbone_config)
    adapter_config, notes = model_class.fit_options(backbone, adapter_options)
    splits = data_config.splits()  # an impossible split fails before anything is written
    run_dir = RunDir(Path(out))
    run_dir.prepare_new(overwrite)
    run = RunConfig(adapter=adapter, adapter_config=adapter_config.to_dict(),
                    backbone=backbone_config, backbone_identity=backbone.identity,
                    data=data_config, train=train_config, class_names=splits.class_names,
                    preprocessing=backbone.preprocessor.to_dict(), task=splits.task)
    atomic_write_json(run_dir.config_path, run.to_dict())
    return PreparedRun(run_dir, run, backbone, splits, notes)


def existing_run(out: Path) -> PreparedRun:
    """A run made earlier (to resume), on the very backbone it was started on."""
    run_dir = RunDir(Path(out))
    run = load_run_config(run_dir)
    backbone = load_backbone(run.backbone, expected_identity=run.backbone_identity)
    return PreparedRun(run_dir, run, backbone, run.splits())


def run_training(prepared: PreparedRun, resume: bool = False) -> TrainResult:
    """Train (from the last checkpoint with `resume`); record what came out in the config."""
    run, run_dir = prepared.run, prepared.run_dir
    result = train(run, run_dir, prepared.backbone, prepared.splits, resume=resume)
    run.parameters = result.parameters
    run.weights_sha256 = sha256_file(run_dir.weights_path)
    if run_dir.bank_path.exists():
        run.bank_sha256 = sha256_file(run_dir.bank_path)
    atomic_write_json(run_dir.config_path, run.to_dict())
    return result
