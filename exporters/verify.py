"""`mmdeploy verify`: re-check every exported backend of a run against PyTorch."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mmdeploy.artifacts import Manifest, RunDir
from mmdeploy.config import ExportConfig
from mmdeploy.errors import ArtifactError
from mmdeploy.runs import load_model

from .export import parity_batches, parity_inputs, run_parity
from .parity import ParityReport


def verify_run(run_path: str | Path, log: Callable[[str], None] = print) -> list[ParityReport]:
    """Hashes of every exported file, then parity on fresh random inputs and real images."""
    from mmdeploy.runtime import load_predictor

    run_dir = RunDir(Path(run_path))
    manifest = Manifest.load(run_dir.manifest_path)
    manifest.verify_files(run_dir.export_dir)
    log(f"{len(manifest.files)} exported file(s) match their sha256")
    if not manifest.parity:
        raise ArtifactError(f"{run_dir.manifest_path}: no exported backend to verify")
    reference, run = load_model(run_dir.root)
    seed = int.from_bytes(os.urandom(4), "little")
    reports = []
    for backend, recorded in manifest.parity.items():
        predictor = load_predictor(run_dir.root, backend)
        low, high = predictor.batch_range  # each export's own range (a TensorRT profile)
        batches = parity_batches(ExportConfig(batch_min=low, batch_opt=low, batch_max=high))
        cases = parity_inputs(run, reference.backbone.preprocessor, batches, seed)
        report = run_parity(backend, recorded["precision"], reference, predictor.run_pixels,
                            cases)
        status = "passed" if report.passed else "FAILED"
        log(f"{backend} {recorded['precision']}: {status} ({_worst(report)})")
        reports.append(report)
    return reports


def _worst(report: ParityReport) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in report.worst.items() if v is not None)
