"""Export a run: merge and freeze, compile, check, verify parity, then publish.

Files are written to `export/.staging/` first. Only an export that passes the op lint and
parity moves into `export/` and into `manifest.json`; one that fails is kept aside as
`export/<file>.failed` with its report beside it, and never served. An earlier good export
stays untouched either way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmdeploy.artifacts import Manifest, RunDir, atomic_write_json
from mmdeploy.backbone import load_backbone
from mmdeploy.config import ExportConfig
from mmdeploy.data import load_labeled, make_splits, read_image
from mmdeploy.errors import ArtifactError, ConfigError, MmdeployError
from mmdeploy.images import Preprocessor
from mmdeploy.runs import RunConfig, load_model, load_run_config
from mmdeploy.runtime.onnxruntime import OnnxSession

from .lint import check_for_target, lint_onnx
from .onnx import export_onnx
from .parity import ParityReport, evaluate

FORMATS = ("onnx",)
_VERSIONED = ("mm-peft-deploy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime")


def parity_batches(config: ExportConfig) -> list[int]:
    """Batch 1, an odd batch, and the largest of the profile."""
    odd = min(7, config.batch_max) | 1
    return sorted({config.batch_min, odd, config.batch_max})


def parity_inputs(run: RunConfig, preprocessor: Preprocessor, batches: list[int],
                  seed: int) -> list[tuple[str, torch.Tensor]]:
    """Fresh random pixels and real images (the run's validation split) at each batch size."""
    generator = torch.Generator().manual_seed(seed)
    height, width = preprocessor.image_size
    largest = max(batches)
    real = preprocessor([read_image(s) for s in _real_samples(run, largest)])
    cases = []
    for batch in batches:
        cases.append(("random", torch.randn(batch, 3, height, width, generator=generator)))
        cases.append(("real", torch.from_numpy(np.resize(real, (batch, *real.shape[1:])))))
    return cases


def _real_samples(run: RunConfig, count: int):
    """Held-out images of the run's data, spread over its classes (splits are class-major);
    the bundled set, real images too, when the training data is no longer there."""
    d = run.data
    try:
        splits = make_splits(load_labeled(d.source), d.shots, d.val_per_class,
                             d.test_per_class, d.split_seed)
        pool = splits.val + splits.test
    except MmdeployError:
        pool = load_labeled("demo").samples
    return pool[:: max(1, len(pool) // count)][:count]


def run_parity(backend: str, precision: str, reference, candidate: Callable,
               cases: list[tuple[str, torch.Tensor]]) -> ParityReport:
    checks = []
    with torch.inference_mode():
        for kind, pixels in tqdm(cases, desc=f"parity {backend}", unit="case", leave=False):
            logits, embeddings = reference(pixels)
            expected = {"logits": logits.numpy(), "embeddings": embeddings.numpy()}
            checks.append((kind, len(pixels), expected, candidate(pixels.numpy())))
    return evaluate(backend, precision, checks)


def export_run(run_path: str | Path, formats: tuple[str, ...], config: ExportConfig,
               log: Callable[[str], None] = print) -> Manifest:
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ConfigError(f"unknown export format(s) {', '.join(sorted(unknown))}; "
                          f"available: {', '.join(FORMATS)}")
    run_dir = RunDir(Path(run_path))
    run = load_run_config(run_dir)
    log(f"loading {run.adapter} run {run_dir.root}")
    reference, _ = load_model(run_dir.root)
    # A second copy on its own backbone: merging and freezing must not touch the reference.
    backbone = load_backbone(run.backbone, expected_identity=run.backbone_identity)
    deploy = load_model(run_dir.root, backbone=backbone)[0].to_deploy()
    preprocessor = reference.backbone.preprocessor
    seed = int.from_bytes(os.urandom(4), "little")
    cases = parity_inputs(run, preprocessor, parity_batches(config), seed)
    form_gap = _form_gap(reference, deploy, cases)
    log(f"deploy form vs training form: max abs {form_gap:.2e}")

    manifest = _existing_manifest(run_dir)
    for fmt in formats:
        log(f"exporting {fmt} (opset {config.opset}, batch {config.batch_min}..{config.batch_max})")
        _export_onnx(deploy, reference, cases, run_dir, manifest, config, log)
    manifest.extra.update({"deploy_form_max_abs": form_gap, "parity_seed": seed})
    manifest.versions = _versions()
    manifest.save(run_dir.manifest_path)
    return manifest


def _export_onnx(deploy, reference, cases, run_dir: RunDir, manifest: Manifest,
                 config: ExportConfig, log: Callable[[str], None]) -> None:
    staging = run_dir.export_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    path = staging / "model.onnx"
    info = export_onnx(deploy, path, deploy.backbone.preprocessor.image_size,
                       config.batch_min, config.batch_max, config.opset)
    findings = check_for_target(lint_onnx(path), config.target)
    for finding in findings:
        log(f"warning: {finding}")
    log(f"checking parity at batch {', '.join(map(str, parity_batches(config)))} "
        "(random and real images)")
    report = run_parity("onnxruntime", "fp32", reference, OnnxSession(path), cases)
    if not report.passed:
        _keep_aside(staging, run_dir.export_dir, report)
        report.raise_if_failed()
    _publish(staging, run_dir.export_dir, manifest)
    manifest.inputs, manifest.outputs = info["inputs"], info["outputs"]
    manifest.opset = config.opset
    manifest.parity["onnxruntime"] = report.to_dict()
    manifest.extra["batch_range"] = {"min": config.batch_min, "opt": config.batch_opt,
                                     "max": config.batch_max}
    manifest.extra["onnx"] = {"export_seconds": info["seconds"], "nodes": info["nodes"],
                              "nodes_before_onnxslim": info["nodes_exported"],
                              "lint": [str(f) for f in findings], "target": config.target}
    log(f"onnxruntime parity passed: {_summary(report)}")


def _form_gap(reference, deploy, cases) -> float:
    with torch.inference_mode():
        return max(float((reference(x)[0] - deploy(x)[0]).abs().max()) for _, x in cases)


def _existing_manifest(run_dir: RunDir) -> Manifest:
    if not run_dir.manifest_path.exists():
        return Manifest()
    try:
        return Manifest.load(run_dir.manifest_path)
    except ArtifactError:
        return Manifest()  # unreadable: start afresh, the files it named are re-exported


def _publish(staging: Path, export_dir: Path, manifest: Manifest) -> None:
    for path in sorted(staging.iterdir()):
        os.replace(path, export_dir / path.name)
        manifest.add_file(export_dir, path.name)
    shutil.rmtree(staging)


def _keep_aside(staging: Path, export_dir: Path, report: ParityReport) -> None:
    for path in sorted(staging.iterdir()):
        os.replace(path, export_dir / f"{path.name}.failed")
    atomic_write_json(export_dir / "model.onnx.failed.json", report.to_dict())
    shutil.rmtree(staging)


def _summary(report: ParityReport) -> str:
    worst = report.worst
    return ", ".join(f"{k} {v:.3g}" for k, v in worst.items() if v is not None)


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
