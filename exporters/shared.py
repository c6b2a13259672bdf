"""Export runs that share a backbone as one trunk and a branch per run (DESIGN section 11).

`export_shared` writes DIR:

    trunk.onnx               pixel_values -> trunk_features (`models.shared.Trunk`)
    branch-<run>.onnx        trunk_features -> logits, embeddings (one per run)
    manifest.json            a `Manifest`: "trunk" and "branch:<run>" records

Each branch is verified through the trunk as it will be served: the trunk graph's output
fed to the branch graph, against the run's own PyTorch model, on fresh random pixels and
the run's held-out images at batch MIN, an odd batch and MAX, at DESIGN's FP32 bounds
(`parity.run_parity`). Each graph is built in a staging folder and linted like any export
(`formats.onnx_graph`); a branch that fails parity is kept aside as `*.failed` with its
report and left out of the manifest, the others are published; the trunk is published
when at least one branch passed through it. The manifest names only this export's files:
files an earlier manifest in DIR named and this one does not are removed after it is saved.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdeploy.artifacts import ExportRecord, Manifest, RunDir, installed_versions
from mmdeploy.backbone import load_backbone
from mmdeploy.config import ExportConfig
from mmdeploy.errors import ArtifactError, ConfigError
from mmdeploy.interface import INPUT_NAME, OUTPUT_NAMES
from mmdeploy.models.shared import Trunk, as_branch, refuse_other_backbones, trunk_block
from mmdeploy.runs import RunConfig, load_model, load_run_config
from mmdeploy.runtime.onnxruntime import OnnxSession

from .export import VERSIONED, keep_aside, publish, staging_dir
from .formats import onnx_graph
from .parity import ParityReport, parity_batches, parity_inputs, run_parity

TRUNK_FILE = "trunk.onnx"
TRUNK_OUTPUT = "trunk_features"
MANIFEST_FILE = "manifest.json"


@dataclass
class SharedRun:
    """One run of the set: its name in DIR (the run folder's name) and what it records."""

    name: str
    path: Path
    config: RunConfig

    @property
    def branch_file(self) -> str:
        return f"branch-{self.name}.onnx"

    @property
    def record_name(self) -> str:
        return f"branch:{self.name}"


def shared_runs(run_paths: list[Path]) -> list[SharedRun]:
    """The runs, checked before any model is loaded: at least two, distinct names, one
    backbone identity."""
    if len(run_paths) < 2:
        raise ConfigError("--shared takes two or more runs (export a single run with --run)")
    runs = [SharedRun(Path(p).name, Path(p), load_run_config(RunDir(Path(p)))) for p in run_paths]
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--shared: two runs named {repeated[0]!r}; each branch is named "
                          "after its run's folder")
    refuse_other_backbones({str(run.path): run.config.backbone_identity for run in runs})
    return runs


def export_shared(run_paths: list[Path], out: Path, config: ExportConfig,
                  log: Callable[[str], None] = print) -> Manifest:
    """Write `out` (see the module docstring) and return its manifest; raises the first
    failed branch's `ParityError` after publishing the branches that passed."""
    if tuple(config.formats) != ("onnx",) or config.fp16 or config.int8:
        raise ConfigError("--shared exports ONNX FP32 (trunk and branches) only for now")
    runs = shared_runs(run_paths)
    references = {run.name: load_model(run.path)[0] for run in runs}  # each run's own model
    block = trunk_block(references)
    first = runs[0].config
    trunk = Trunk(load_backbone(first.backbone, expected_identity=first.backbone_identity),
                  block)
    log(f"trunk: {'pooled features' if trunk.pooled else f'tokens entering block {block}'} "
        f"(for {', '.join(run.name for run in runs)})")
    out.mkdir(parents=True, exist_ok=True)
    seed = int.from_bytes(os.urandom(4), "little")
    sample = torch.randn(max(2, config.batch_min), 3, *trunk.backbone.preprocessor.image_size)
    with torch.no_grad():
        sample_features = trunk(sample)
    manifest, failures = Manifest(parity_seed=seed), []
    with staging_dir(out, ".staging-trunk") as trunk_staging:
        interface, details = onnx_graph(trunk, trunk_staging / TRUNK_FILE, sample, config, log,
                                        INPUT_NAME, (TRUNK_OUTPUT,))
        trunk_session = OnnxSession(trunk_staging / TRUNK_FILE)
        for run in runs:
            branch = as_branch(load_model(run.path)[0], block)
            with staging_dir(out) as staging:
                branch_interface, branch_details = onnx_graph(
                    branch, staging / run.branch_file, sample_features, config, log,
                    TRUNK_OUTPUT, OUTPUT_NAMES)
                session = OnnxSession(staging / run.branch_file)
                report = _branch_parity(run, references[run.name], trunk_session, session,
                                        config, seed)
                if not report.passed:
                    log(f"{run.name}: failed parity through the trunk ({report.summary()}); "
                        f"kept aside as {run.branch_file}.failed")
                    keep_aside(staging, out, report.to_dict(), run.branch_file)
                    failures.append(report)
                    continue
                record = _record(config, report.to_dict(), branch_interface, {
                    **branch_details, "run": str(run.path.resolve()), "adapter": run.config.adapter,
                    "weights_sha256": run.config.weights_sha256, "trunk": TRUNK_FILE,
                    "first_adapted_block": references[run.name].first_adapted_block()})
                publish(staging, out, record, [run.branch_file])
            manifest.exports[run.record_name] = record
            log(f"{run.name}: passed parity through the trunk ({report.summary()})")
        passed = [run.name for run in runs if run.record_name in manifest.exports]
        check = {"kind": "shared-trunk", "passed": bool(passed), "verified_through": passed}
        if not passed:
            keep_aside(trunk_staging, out, check, TRUNK_FILE)
            failures[0].raise_if_failed()
        trunk_record = _record(config, check, interface, {
            **details, "block": block, "pooled": trunk.pooled,
            "backbone_identity": first.backbone_identity})
        publish(trunk_staging, out, trunk_record, [TRUNK_FILE])
    manifest.exports = {"trunk": trunk_record, **manifest.exports}
    _save_replacing(manifest, out)
    if failures:
        failures[0].raise_if_failed()
    return manifest


def _branch_parity(run: SharedRun, reference, trunk: OnnxSession, branch: OnnxSession,
                   config: ExportConfig, seed: int) -> ParityReport:
    """The branch fed the trunk graph's output, against the run's own PyTorch model."""
    cases = parity_inputs(run.config, reference.backbone.preprocessor, parity_batches(config),
                          seed)
    return run_parity("onnxruntime", "fp32", reference,
                      lambda pixels: branch(trunk(pixels)[TRUNK_OUTPUT]), cases)


def _record(config: ExportConfig, check: dict, interface: dict, details: dict) -> ExportRecord:
    return ExportRecord(
        backend="onnxruntime", precision="fp32", check=check,
        batch_range={"min": config.batch_min, "opt": config.batch_opt, "max": config.batch_max},
        inputs=interface["inputs"], outputs=interface["outputs"], opset=interface["opset"],
        versions=installed_versions(VERSIONED), details=details)


def _save_replacing(manifest: Manifest, out: Path) -> None:
    """Save `manifest` in `out`, then remove the files an earlier one named that it does not
    (branches of runs no longer in the set, one that failed this time)."""
    path = out / MANIFEST_FILE
    try:
        earlier = set(Manifest.load(path).files) if path.exists() else set()
    except ArtifactError:
        earlier = set()
    manifest.save(path)
    for name in sorted(earlier - set(manifest.files)):
        (out / name).unlink(missing_ok=True)
