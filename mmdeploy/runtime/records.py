"""Export records as the runtime needs them (no torch): what each one is and how to make it,
and a record looked up and verified for a predictor."""

from __future__ import annotations

from ..artifacts import ExportRecord, Manifest, RunDir
from ..errors import ArtifactError

SERVING_PRECISIONS = ("fp32", "int8")
"""What `infer` and `serve` can be asked for: "fp32" serves each export at its own precision
(an FP16 engine included), "int8" the run's INT8 graph."""

EXPORT_HINTS = {
    "onnx": "ONNX export (`mmdeploy export --format onnx`)",
    "aoti": "AOTInductor package (`mmdeploy export --format aoti`)",
    "tensorrt": "TensorRT engine (`mmdeploy export --format tensorrt` on a GPU machine)",
    "int8": "INT8 export (`mmdeploy export --int8` on the run's ONNX export)",
}
"""What each export record is, and how to make it: said when a run lacks one."""



def verified_record(run_dir: RunDir, name: str) -> ExportRecord:
    """The run's export `name`, once it passed its check and its files match their sha256."""
    if not run_dir.manifest_path.exists():
        raise ArtifactError(f"{run_dir.export_dir}: the run has no export; run `mmdeploy "
                            "export` first")
    record = Manifest.load(run_dir.manifest_path).record(name)
    if record is None:
        raise ArtifactError(f"{run_dir.export_dir}: no verified {EXPORT_HINTS[name]}")
    record.verify_files(run_dir.export_dir)
    return record
