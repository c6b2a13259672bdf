"""A run: what was trained (adapter_config.json) and how to rebuild the model from it.

Reading a run imports no torch (batch inference's decode workers read one); building or
loading its model does, through the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .artifacts import (
    RunDir,
    load_safetensors,
    read_json,
    safetensors_metadata,
    sha256_file,
)
from .config import BackboneConfig, ConfigBase, DataConfig, TrainConfig
from .data import DEMO, TASKS, Sample, Splits, load_labeled
from .errors import ArtifactError, BackboneMismatchError, ConfigError, MmdeployError
from .registry import adapter_class

if TYPE_CHECKING:
    from .backbone import Backbone


@dataclass
class RunConfig(ConfigBase):
    """Everything `adapter_config.json` records; enough to rebuild the model exactly."""

    adapter: str
    adapter_config: dict
    backbone: BackboneConfig
    backbone_identity: dict
    data: DataConfig
    train: TrainConfig
    class_names: list[str]  # the answers of a vqa run
    preprocessing: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    weights_sha256: str | None = None  # set when training ends; checked on every load
    bank_sha256: str | None = None  # likewise, for adapters with a memory bank
    package_version: str = __version__
    # What the data makes of the run: `classification` (image -> class) or `vqa` (image +
    # question -> answer); a config written before there were tasks is a classification run.
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r}: must be one of {', '.join(TASKS)}")

    def require_classification(self, stage: str) -> None:
        """Refuse a vqa run in a stage that serves images alone (export and serving of image +
        question runs are not built yet)."""
        if self.task != "classification":
            raise ConfigError(f"{stage}: this is a {self.task} run (image + question -> "
                              "answer); its export and serving are not built yet, only "
                              "training is")

    def typed_adapter_config(self) -> ConfigBase:
        return adapter_class(self.adapter, self.task).config_class.from_dict(self.adapter_config)

    def splits(self) -> Splits:
        """The split the run was trained on, drawn again from its data."""
        return self.data.splits()

    def held_out_samples(self, count: int) -> list[Sample]:
        """`count` held-out images of the run's data (validation, then test), spread over its
        classes (splits are class-major); the bundled set, real images too, when the
        training data is no longer there. Parity and the INT8 gate measure on these."""
        try:
            splits = self.splits()
            pool = splits.val + splits.test
        except MmdeployError:
            pool = load_labeled(DEMO).samples
        return pool[:: max(1, len(pool) // count)][:count]


def build_model(run: RunConfig, backbone: Backbone):
    """A fresh (untrained) adapted model for this run on this backbone."""
    cls = adapter_class(run.adapter, run.task)
    try:
        return cls(backbone, run.typed_adapter_config(), run.class_names,
                   run.data.prompt_template)
    except ValueError as exc:
        raise ConfigError(f"adapter {run.adapter!r}: {exc}") from None


def load_run_config(run_dir: RunDir) -> RunConfig:
    run_dir.require()
    try:
        return RunConfig.from_dict(read_json(run_dir.config_path))
    except ConfigError as exc:
        raise ArtifactError(f"{run_dir.config_path}: {exc}") from None


def check_weights(run_dir: RunDir, run: RunConfig) -> None:
    """The adapter weights are the ones training finished with."""
    _check_digest(run_dir.weights_path, run.weights_sha256)


def _check_digest(path: Path, expected: str | None) -> None:
    if expected is None or not path.is_file():
        return  # an unfinished run, or a missing file that loading will name
    digest = sha256_file(path)
    if digest != expected:
        raise ArtifactError(f"{path}: sha256 mismatch (adapter_config.json {expected[:8]}..., "
                            f"file {digest[:8]}...)")


def load_bank(model, run_dir: RunDir, run: RunConfig) -> None:
    """Restore the memory bank of a model that keeps one, checked against the run."""
    path = run_dir.bank_path
    if not path.exists():
        raise ArtifactError(f"{path}: missing; a {run.adapter!r} run needs its memory bank "
                            "(retrain the run, or restore the file)")
    state = load_safetensors(path)
    _check_digest(path, run.bank_sha256)
    try:
        model.load_bank_state_dict(state)
    except KeyError as exc:
        raise ArtifactError(f"{path}: {exc.args[0]}") from None


def load_model(path: str | Path, backbone: Backbone | None = None):
    """The trained model of a run, in eval mode, on the backbone it was trained on."""
    run_dir = RunDir(Path(path))
    run = load_run_config(run_dir)
    if backbone is None:
        from .backbone import load_backbone

        backbone = load_backbone(run.backbone, expected_identity=run.backbone_identity)
    elif backbone.identity != run.backbone_identity:
        raise BackboneMismatchError(f"{path} was trained on another backbone")
    model = build_model(run, backbone)
    state = load_safetensors(run_dir.weights_path)
    written_for = safetensors_metadata(run_dir.weights_path).get("adapter")
    if written_for not in (None, type(model).__name__):
        raise ArtifactError(f"{run_dir.weights_path}: holds {written_for} weights, but the run "
                            f"is a {run.adapter!r} run")
    check_weights(run_dir, run)  # last: the checks above say more precisely what is wrong
    try:
        model.load_adapter_state_dict(state)
    except KeyError as exc:
        raise ArtifactError(f"{run_dir.weights_path}: {exc.args[0]}") from None
    if model.needs_bank:
        load_bank(model, run_dir, run)
    return model.eval(), run
