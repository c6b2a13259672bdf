"""Export runs that share a backbone as one trunk and a branch per run (DESIGN section 11).

`export_shared` writes DIR, for each format asked (onnx: ONNX Runtime, `.onnx`; aoti:
AOTInductor compiled for this machine's device, `.pt2`):

    trunk.onnx               pixel_values -> trunk_features (`models.shared.Trunk`)
    branch-<run>.onnx        trunk_features -> logits, embeddings (one per run)
    manifest.json            a `Manifest`: "<format>:trunk" and "<format>:branch:<run>"

Each branch is verified through the trunk as it will be served: the trunk engine's output
fed to the branch engine, against the run's own PyTorch model, on fresh random pixels and
the run's held-out images at batch MIN, an odd batch and MAX, at DESIGN's FP32 bounds
(`parity.run_parity`). Each engine is built in a staging folder (ONNX graphs linted like
any export: `formats.onnx_graph`); a branch that fails parity is kept aside as `*.failed`
with its report and left out of the manifest, the others are published; the trunk is
published when at least one branch passed through it. The manifest names only this
export's files: files an earlier manifest in DIR named and this one does not are removed
after it is saved.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmdeploy.artifacts import ExportRecord, Manifest, RunDir, installed_versions
from mmdeploy.backbone import identity_summary, load_backbone, torch_device
from mmdeploy.config import ExportConfig
from mmdeploy.errors import ArtifactError, BackboneMismatchError, ConfigError
from mmdeploy.interface import INPUT_NAME, OUTPUT_NAMES
from mmdeploy.models.shared import Trunk, as_branch, refuse_other_backbones, trunk_block
from mmdeploy.runs import RunConfig, load_model, load_run_config
from mmdeploy.runtime.aoti import AotiPackage
from mmdeploy.runtime.onnxruntime import OnnxSession
from mmdeploy.runtime.shared import MANIFEST_FILE, branch_name, trunk_name

from .aoti import compile_program
from .export import VERSIONED, describe, keep_aside, publish, staging_dir
from .formats import onnx_graph
from .parity import ParityReport, parity_batches, parity_inputs, run_parity

TRUNK = "trunk"
TRUNK_OUTPUT = "trunk_features"


@dataclass(frozen=True)
class _Engine:
    """One format of the trunk and branches: the files' suffix, the backend that serves
    them (its parity bounds), how to build one graph (-> interface, record details) and how
    to load one to run it (numpy in, outputs by name)."""

    suffix: str
    backend: str
    build: Callable[[nn.Module, Path, torch.Tensor, tuple[str, tuple[str, ...]],
                     ExportConfig, Callable[[str], None]], tuple[dict, dict]]
    load: Callable[[Path, tuple[str, ...]], Callable[[np.ndarray], dict]]


def _build_onnx(model, path, sample, names, config, log) -> tuple[dict, dict]:
    return onnx_graph(model, path, sample, config, log, *names)


def _build_aoti(model, path, sample, names, config, log) -> tuple[dict, dict]:
    """Compiled for this machine's device; the interface read from the module itself."""
    details = compile_program(model, path, sample, config.batch_min, config.batch_max,
                              torch_device())
    log(f"compiled {path.name} in {details['compile_seconds']:.1f} s")
    with torch.no_grad():
        outputs = model(sample)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
    input_name, output_names = names
    interface = {"inputs": [describe(input_name, sample)], "opset": None,
                 "outputs": [describe(n, t) for n, t in zip(output_names, outputs, strict=True)]}
    return interface, details


ENGINES = {
    "onnx": _Engine(".onnx", "onnxruntime", _build_onnx, lambda path, names: OnnxSession(path)),
    "aoti": _Engine(".pt2", "aoti", _build_aoti,
                    lambda path, names: AotiPackage(path, torch_device(), "fp32", names)),
}


@dataclass
class SharedRun:
    """One run of the set: its name in DIR (the run folder's name) and what it records."""

    name: str
    path: Path
    config: RunConfig

    def record_name(self, fmt: str) -> str:
        return branch_name(fmt, self.name)


def shared_runs(run_paths: list[Path]) -> list[SharedRun]:
    """The runs, checked before any model is loaded: at least two, distinct names, one
    backbone identity."""
    if len(run_paths) < 2:
        raise ConfigError("--shared takes two or more runs (export a single run with --run)")
    runs = [SharedRun(Path(p).name, Path(p), load_run_config(RunDir(Path(p)))) for p in run_paths]
    for run in runs:
        run.config.require_classification(f"export --shared {run.path}")
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--shared: two runs named {repeated[0]!r}; each branch is named "
                          "after its run's folder")
    refuse_other_backbones({str(run.path): run.config.backbone_identity for run in runs})
    return runs


@dataclass
class _SharedExport:
    """What every format's export of one set shares: the runs, their reference models,
    the trunk, the samples the graphs are traced with, the parity seed."""

    runs: list[SharedRun]
    references: dict[str, nn.Module]
    trunk: Trunk
    config: ExportConfig
    out: Path
    seed: int
    log: Callable[[str], None]

    @property
    def sample(self) -> torch.Tensor:
        size = self.trunk.backbone.preprocessor.image_size
        return torch.randn(max(2, self.config.batch_min), 3, *size)


def export_shared(run_paths: list[Path], out: Path, config: ExportConfig,
                  log: Callable[[str], None] = print) -> Manifest:
    """Write `out` (see the module docstring) for each of `config.formats` (onnx, aoti)
    and return its manifest; raises the first failed branch's `ParityError` after
    publishing what passed."""
    unknown = sorted(set(config.formats) - set(ENGINES))
    if unknown or config.fp16 or config.int8:
        raise ConfigError("--shared exports FP32 trunk and branches to onnx and aoti only "
                          f"(not {', '.join(unknown) or '--fp16/--int8'})")
    runs = shared_runs(run_paths)
    references = {run.name: load_model(run.path)[0] for run in runs}  # each run's own model
    block = trunk_block(references)
    first = runs[0].config
    trunk = Trunk(load_backbone(first.backbone, expected_identity=first.backbone_identity),
                  block)
    log(f"trunk: {'pooled features' if trunk.pooled else f'tokens entering block {block}'} "
        f"(for {', '.join(run.name for run in runs)})")
    out.mkdir(parents=True, exist_ok=True)
    job = _SharedExport(runs, references, trunk, config, out,
                        int.from_bytes(os.urandom(4), "little"), log)
    manifest, failures = Manifest(parity_seed=job.seed), []
    for fmt in config.formats:
        failures += _export_engine(job, fmt, manifest)
    if manifest.exports:  # else nothing was published: an earlier export stays as it was
        _save_replacing(manifest, out)
    if failures:
        failures[0].raise_if_failed()
    return manifest


def add_to_shared(shared_dir: Path, run_path: Path,
                  log: Callable[[str], None] = print) -> str:
    """Export one more run's branch into the shared export `shared_dir`, against the trunk
    already there (a live server's: it is not rebuilt), in each format it has, verified
    through that trunk graph as `export_shared` verifies; the manifest gains the branch once
    it passed; a run whose branch is there already (same path and weights: removed from a
    server and added again) is not exported again. Returns the branch's name (the run
    folder's). Refused in one line: a run on
    another backbone, or one adapting a block the trunk already runs frozen (export the set
    again with --shared)."""
    manifest = Manifest.load(shared_dir / MANIFEST_FILE)
    trunks = {fmt: record for fmt in ENGINES
              if (record := manifest.record(trunk_name(fmt))) is not None}
    if not trunks:
        raise ArtifactError(f"{shared_dir.name}: no verified trunk to add a branch to")
    run = SharedRun(run_path.name, run_path, load_run_config(RunDir(run_path)))
    first = next(iter(trunks.values()))
    if run.config.backbone_identity != first.details["backbone_identity"]:
        raise BackboneMismatchError(
            f"{run.name} was trained on another backbone "
            f"({identity_summary(run.config.backbone_identity)}) than this trunk's "
            f"({identity_summary(first.details['backbone_identity'])}): one trunk serves one "
            "backbone")
    exported = [manifest.record(run.record_name(fmt)) for fmt in trunks]
    if all(record is not None and record.details["run"] == str(run.path.resolve())
           and record.details["weights_sha256"] == run.config.weights_sha256
           for record in exported):
        log(f"{run.name}: its branch is in {shared_dir.name} already, verified through this "
            "trunk (same weights); not exported again")
        return run.name
    reference = load_model(run.path)[0]
    block, adapted = first.details["block"], reference.first_adapted_block()
    if adapted is None or adapted < block:
        where = "every block" if adapted is None else f"block {adapted}"
        raise ConfigError(f"{run.name} adapts {where}, before this trunk's cut at block "
                          f"{block}: export the set again with --shared to serve it")
    records = {}
    for fmt, trunk in trunks.items():
        config = ExportConfig(formats=(fmt,), batch_min=trunk.batch_range["min"],
                              batch_opt=trunk.batch_range["opt"],
                              batch_max=trunk.batch_range["max"])
        trunk.verify_files(shared_dir)
        trunk_graph = ENGINES[fmt].load(shared_dir / trunk.main_file, (TRUNK_OUTPUT,))
        size = reference.backbone.preprocessor.image_size
        sample = np.random.default_rng(0).standard_normal(
            (max(2, config.batch_min), 3, *size)).astype(np.float32)
        features = torch.from_numpy(trunk_graph(sample)[TRUNK_OUTPUT])
        record, report = _export_branch(fmt, run, reference, block, trunk_graph, features,
                                        trunk.main_file, config,
                                        manifest.parity_seed or 0, shared_dir, log)
        if record is None:
            report.raise_if_failed()
        records[run.record_name(fmt)] = record
    manifest = Manifest.load(shared_dir / MANIFEST_FILE)  # as it is now
    manifest.exports.update(records)
    manifest.save(shared_dir / MANIFEST_FILE)
    return run.name


def _export_engine(job: _SharedExport, fmt: str, manifest: Manifest) -> list[ParityReport]:
    """The trunk and every branch in format `fmt`: each branch published once it passed
    parity through the staged trunk, the trunk once a branch passed (kept aside with the
    branches when none did). Returns the failed branches' reports."""
    engine, out, config = ENGINES[fmt], job.out, job.config
    trunk_file = TRUNK + engine.suffix
    sample = job.sample
    with torch.no_grad():
        sample_features = job.trunk(sample)
    failures, passed = [], []
    with staging_dir(out, ".staging-trunk") as trunk_staging:
        interface, details = engine.build(job.trunk, trunk_staging / trunk_file, sample,
                                          (INPUT_NAME, (TRUNK_OUTPUT,)), config, job.log)
        trunk_graph = engine.load(trunk_staging / trunk_file, (TRUNK_OUTPUT,))
        for run in job.runs:
            record, report = _export_branch(
                fmt, run, job.references[run.name], job.trunk.block, trunk_graph,
                sample_features, trunk_file, job.config, job.seed, out, job.log)
            if record is None:
                failures.append(report)
                continue
            manifest.exports[run.record_name(fmt)] = record
            passed.append(run.name)
        check = {"kind": "shared-trunk", "passed": bool(passed), "verified_through": passed}
        if not passed:
            keep_aside(trunk_staging, out, check, trunk_file)
            return failures
        trunk_record = _record(engine, config, check, interface, {
            **details, "block": job.trunk.block, "pooled": job.trunk.pooled,
            "backbone_identity": job.runs[0].config.backbone_identity})
        publish(trunk_staging, out, trunk_record, [trunk_file])
    manifest.exports[trunk_name(fmt)] = trunk_record
    return failures


def _export_branch(fmt: str, run: SharedRun, reference: nn.Module, block: int,
                   trunk_graph: Callable, sample_features: torch.Tensor, trunk_file: str,
                   config: ExportConfig, seed: int, out: Path, log: Callable[[str], None],
                   ) -> tuple[ExportRecord | None, ParityReport]:
    """Build `run`'s branch in format `fmt` from the trunk's output at `block`, check it fed
    `trunk_graph`'s output against `reference` (the run's own PyTorch model) and publish it
    in `out`: (its record, the report); (None, the report) when it failed, kept aside."""
    engine = ENGINES[fmt]
    branch_file = f"branch-{run.name}{engine.suffix}"
    branch = as_branch(load_model(run.path)[0], block)
    with staging_dir(out) as staging:
        interface, details = engine.build(branch, staging / branch_file, sample_features,
                                          (TRUNK_OUTPUT, OUTPUT_NAMES), config, log)
        graph = engine.load(staging / branch_file, OUTPUT_NAMES)
        cases = parity_inputs(run.config, reference.backbone.preprocessor,
                              parity_batches(config), seed)
        report = run_parity(engine.backend, "fp32", reference,
                            lambda pixels: graph(trunk_graph(pixels)[TRUNK_OUTPUT]), cases)
        if not report.passed:
            log(f"{run.name}: {fmt} failed parity through the trunk ({report.summary()}); "
                f"kept aside as {branch_file}.failed")
            keep_aside(staging, out, report.to_dict(), branch_file)
            return None, report
        record = _record(engine, config, report.to_dict(), interface, {
            **details, "run": str(run.path.resolve()), "adapter": run.config.adapter,
            "weights_sha256": run.config.weights_sha256, "trunk": trunk_file,
            "first_adapted_block": reference.first_adapted_block()})
        publish(staging, out, record, [branch_file])
    log(f"{run.name}: {fmt} passed parity through the trunk ({report.summary()})")
    return record, report


def _record(engine: _Engine, config: ExportConfig, check: dict, interface: dict,
            details: dict) -> ExportRecord:
    return ExportRecord(
        backend=engine.backend, precision="fp32", check=check,
        device=torch_device() if engine.backend == "aoti" else None,
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
