"""Export a run: merge and freeze, compile, check, verify parity, then publish.

Every format (`formats.FORMATS`: onnx, aoti, tensorrt) goes through the same path here.
Files are written to `export/.staging/` first. Only an export that passes the op lint and
parity moves into `export/` and into `manifest.json`; one that fails is kept aside as
`export/<file>.failed` with its report beside it, and never served. An earlier good export
stays untouched either way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmdeploy.artifacts import Manifest, RunDir, atomic_write_json, installed_versions
from mmdeploy.backbone import load_backbone
from mmdeploy.config import ExportConfig
from mmdeploy.data import load_labeled, make_splits, read_image
from mmdeploy.errors import ArtifactError, MmdeployError
from mmdeploy.images import Preprocessor
from mmdeploy.runs import RunConfig, load_model, load_run_config
from mmdeploy.runtime.onnxruntime import ONNX_FILE

from .formats import FORMATS, ExportJob, plan_formats
from .parity import ParityReport, evaluate

_VERSIONED = ("mm-peft-deploy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime",
              "onnxruntime-gpu", "tensorrt")


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
    """Export `formats` of a run; each is published only once it passes parity."""
    run_dir = RunDir(Path(run_path))
    run = load_run_config(run_dir)
    manifest = _existing_manifest(run_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_formats(formats, config.fp16, device, has_onnx=ONNX_FILE in manifest.files)
    for fmt, precision in plan:
        log(f"will export {fmt} ({precision})")
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

    for fmt, precision in plan:
        log(f"exporting {fmt} {precision} (batch {config.batch_min}..{config.batch_max})")
        job = ExportJob(deploy, run_dir, config, precision, device, log)
        _export_format(fmt, job, reference, cases, manifest)
        # Saved after each format: a later one failing leaves this one listed and servable.
        manifest.extra.update({"deploy_form_max_abs": form_gap, "parity_seed": seed})
        manifest.versions = installed_versions(_VERSIONED)
        manifest.save(run_dir.manifest_path)
    return manifest


def _export_format(fmt: str, job: ExportJob, reference, cases, manifest: Manifest) -> None:
    """Build into export/.staging/, check parity, then publish or keep aside."""
    export_dir = job.run_dir.export_dir
    staging = export_dir / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        built = FORMATS[fmt].build(job, staging)
        batches = ", ".join(map(str, parity_batches(job.config)))
        job.log(f"checking {built.backend} parity at batch {batches} (random and real images)")
        report = run_parity(built.backend, job.precision, reference, built.candidate, cases)
        if not report.passed:
            _keep_aside(staging, export_dir, report, built.files[0])
            report.raise_if_failed()
        _publish(staging, export_dir, manifest, built.files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.parity[built.backend] = report.to_dict()
    manifest.extra[fmt] = built.details
    manifest.extra["batch_range"] = {"min": job.config.batch_min, "opt": job.config.batch_opt,
                                     "max": job.config.batch_max}
    if built.interface:
        manifest.inputs, manifest.outputs = built.interface["inputs"], built.interface["outputs"]
        manifest.opset = built.interface["opset"]
    job.log(f"{built.backend} parity passed ({job.precision}): {_summary(report)}")


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


def _publish(staging: Path, export_dir: Path, manifest: Manifest, files: list[str]) -> None:
    for name in files:
        os.replace(staging / name, export_dir / name)
        manifest.add_file(export_dir, name)


def _keep_aside(staging: Path, export_dir: Path, report: ParityReport, primary: str) -> None:
    for path in sorted(staging.iterdir()):
        os.replace(path, export_dir / f"{path.name}.failed")
    atomic_write_json(export_dir / f"{primary}.failed.json", report.to_dict())


def _summary(report: ParityReport) -> str:
    worst = report.worst
    return ", ".join(f"{k} {v:.3g}" for k, v in worst.items() if v is not None)


