"""`mmdeploy info`: what a run holds, read from its files alone (no model is built)."""

from __future__ import annotations

from pathlib import Path

from .artifacts import Manifest, RunDir
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
        details["parity"] = {backend: {"precision": r["precision"], "passed": r["passed"],
                                       **r.get("worst", {})}
                             for backend, r in manifest.parity.items()}
        if int8 := manifest.extra.get("int8"):
            gate = int8["gate"]
            details["int8"] = {"file": int8["file"], "method": int8["method"],
                               "passed": gate["passed"], "agreement": gate["agreement"],
                               "accuracy_drop_points": gate["accuracy_drop_points"],
                               "kept_fp32": len(int8["kept_fp32"]),
                               "serve_default": int8.get("serve_default", False)}
    return details
