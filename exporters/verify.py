"""`mmdeploy verify`: re-check every exported backend of a run against PyTorch, and the
INT8 graph (if any) against its accuracy gate."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mmdeploy.artifacts import Manifest, RunDir
from mmdeploy.config import ExportConfig
from mmdeploy.errors import ArtifactError
from mmdeploy.runs import RunConfig, load_model
from mmdeploy.runtime.onnxruntime import OnnxSession

from .gate import GateBounds, GateReport, candidate_logits, gate_check, gate_data, measure
from .parity import ParityReport, parity_batches, parity_inputs, run_parity


def verify_run(run_path: str | Path,
               log: Callable[[str], None] = print) -> list[ParityReport | GateReport]:
    """Hashes of every exported file, then parity on fresh random inputs and real images,
    then the INT8 graph's accuracy gate, with the bounds it was published under."""
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
        if recorded["precision"] == "int8":  # a TensorRT INT8 engine: held to its gate
            report = gate_check(run, reference, predictor.run_pixels,
                                GateBounds(**recorded["bounds"]), f"{backend} int8", high)
            log(f"{backend} int8: {'passed' if report.passed else 'FAILED'} the accuracy gate "
                f"({report.summary()})")
            reports.append(report)
            continue
        batches = parity_batches(ExportConfig(batch_min=low, batch_opt=low, batch_max=high))
        cases = parity_inputs(run, reference.backbone.preprocessor, batches, seed)
        report = run_parity(backend, recorded["precision"], reference, predictor.run_pixels,
                            cases)
        status = "passed" if report.passed else "FAILED"
        log(f"{backend} {recorded['precision']}: {status} ({report.summary()})")
        reports.append(report)
    if "int8" in manifest.extra:
        reports.append(verify_int8(run_dir.export_dir, manifest.extra["int8"], run, reference,
                                   log))
    return reports


def verify_int8(export_dir: Path, record: dict, run: RunConfig, reference,
                log: Callable[[str], None] = print) -> GateReport:
    """The INT8 graph's gate, measured afresh (its sha256 is checked by the caller)."""
    bounds = GateBounds(**record["gate"]["bounds"])
    data = gate_data(run, reference, reference.backbone.preprocessor)
    report = measure(data, candidate_logits(OnnxSession(export_dir / record["file"]),
                                            data.pixels), bounds)
    status = "passed" if report.passed else "FAILED"
    log(f"{report.backend} ({record['method']}): {status} the accuracy gate "
        f"({report.summary()})")
    return report

