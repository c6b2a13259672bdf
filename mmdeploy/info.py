"""`mmdeploy info`: what a run holds, read from its files alone (no model is built)."""

from __future__ import annotations

from pathlib import Path

from .artifacts import ExportRecord, Manifest, RunDir
from .runs import load_run_config


def describe_run(run_path: str | Path) -> dict:
    run_dir = RunDir(Path(run_path))
    run = load_run_config(run_dir)
    details = {
        "run": str(run_dir.root),
        "adapter": run.adapter,
        "adapter_config": run.adapter_config,
        "backbone": run.backbone.spec,
        "backbone_identity": run.backbone_identity,
        "classes": run.class_names,
        "parameters": run.parameters,
        "trained": run_dir.weights_path.exists(),
    }
    if run_dir.manifest_path.exists():
        manifest = Manifest.load(run_dir.manifest_path)
        details["exported_files"] = {name: entry["size"] for name, entry in manifest.files.items()}
        details["exports"] = {name: _export_summary(record)
                              for name, record in manifest.exports.items()}
    return details


def _export_summary(record: ExportRecord) -> dict:
    """An export's backend, precision, batch range and check, with the check's worst
    figures: parity's (max abs, min cosine, top-1 agreement) or the INT8 gate's (top-1
    agreement, accuracy drop in points)."""
    check = record.check
    figures = check.get("worst") or {"top1_agreement": check.get("agreement"),
                                     "accuracy_drop_points": check.get("accuracy_drop_points")}
    low, high = record.batch_limits
    summary = {"backend": record.backend, "precision": record.precision,
               "batch_range": f"{low}..{high}", "check": check.get("kind"),
               "passed": record.passed, **figures}
    if "serve_default" in record.details:
        summary["serve_default"] = record.details["serve_default"]
    return summary
