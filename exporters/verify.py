"""`mmdeploy verify`: re-check every exported backend of a run against PyTorch, and the
INT8 graph (if any) against its accuracy gate."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mmdeploy.artifacts import ExportRecord, Manifest, RunDir
from mmdeploy.config import ExportConfig
from mmdeploy.errors import ArtifactError
from mmdeploy.runs import RunConfig, load_model
from mmdeploy.runtime.onnxruntime import OnnxSession

from .gate import GateBounds, GateReport, candidate_logits, gate_check, gate_data, measure
from .parity import CheckReport, parity_batches, parity_cases, run_parity


def verify_run(run_path: str | Path,
               log: Callable[[str], None] = print) -> list[CheckReport]:
    """Hashes of every exported file, then each export's check measured afresh, under the
    bounds it was published with: parity on fresh random inputs and real images at its own
    batch range (a vqa run's: with real questions at several lengths, tokenized by the
    tokenizer saved with the export), or for an INT8 graph or engine its accuracy gate."""
    from mmdeploy.runtime import BACKEND_TABLE, load_predictor

    run_dir = RunDir(Path(run_path))
    manifest = Manifest.load(run_dir.manifest_path)
    manifest.verify_files(run_dir.export_dir)
    log(f"{len(manifest.files)} exported file(s) match their sha256")
    served = {name: record for name, record in manifest.exports.items()
              if record.backend in BACKEND_TABLE}
    for name, record in manifest.exports.items():
        if name not in served:  # a Triton repository: validated when written, outside export/
            log(f"{name}: {record.details.get('repository')} (not served from this run)")
    if not served:
        raise ArtifactError(f"{run_dir.manifest_path}: no exported backend to verify")
    reference, run = load_model(run_dir.root)
    seed = int.from_bytes(os.urandom(4), "little")
    reports: list[CheckReport] = []
    for name, record in served.items():
        if name == "int8":
            reports.append(verify_int8(run_dir.export_dir, record, run, reference, log))
            continue
        predictor = load_predictor(run_dir.root, record.backend)
        low, high = record.batch_limits  # each export's own range
        if record.precision == "int8":  # a TensorRT INT8 engine: held to its gate
            report = gate_check(run, reference, predictor.run_pixels,
                                GateBounds(**record.check["bounds"]), f"{name} int8", high)
        else:
            batches = parity_batches(ExportConfig(batch_min=low, batch_opt=low, batch_max=high))
            tokenizer = predictor.question_tokenizer if run.task == "vqa" else None
            cases = parity_cases(run, reference.backbone, batches, seed, tokenizer)
            engine = predictor.run_questions if run.task == "vqa" else predictor.run_pixels
            report = run_parity(record.backend, record.precision, reference, engine, cases)
        log(f"{record.backend} {record.precision}: {'passed' if report.passed else 'FAILED'} "
            f"{report.title} ({report.summary()})")
        reports.append(report)
    return reports


def verify_int8(export_dir: Path, record: ExportRecord, run: RunConfig, reference,
                log: Callable[[str], None] = print) -> GateReport:
    """The INT8 graph's gate, measured afresh (its sha256 is checked by the caller)."""
    bounds = GateBounds(**record.check["bounds"])
    data = gate_data(run, reference, reference.backbone.preprocessor)
    report = measure(data, candidate_logits(OnnxSession(export_dir / record.main_file),
                                            data.inputs), bounds)
    status = "passed" if report.passed else "FAILED"
    log(f"{report.backend} ({record.details['method']}): {status} the accuracy gate "
        f"({report.summary()})")
    return report

