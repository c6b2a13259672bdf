"""ONNX Runtime: the exported graph, on the CUDA provider when `onnxruntime-gpu` has one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import Manifest
from ..errors import ArtifactError, BackendUnavailableError
from .base import Predictor

ONNX_FILE = "model.onnx"


def available_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError("onnxruntime", f"cannot import onnxruntime ({exc}); "
                                      "pip install onnxruntime") from None
    return onnxruntime.get_available_providers()


def create_session(path: Path, threads: int | None = None):
    """An InferenceSession on the best provider present (CUDA, else CPU)."""
    import onnxruntime

    preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in available_providers()]
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=preferred)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({first_line})") from None


class OnnxSession:
    """An exported graph in ONNX Runtime: pixel_values in, outputs by name."""

    def __init__(self, path: Path, threads: int | None = None):
        self.session = create_session(path, threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.provider = self.session.get_providers()[0]

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {"pixel_values": pixel_values})
        return dict(zip(self.output_names, outputs, strict=True))


class OnnxRuntimePredictor(Predictor):
    backend = "onnxruntime"

    def __init__(self, run_path: str | Path, threads: int | None = None):
        super().__init__(run_path)
        manifest = Manifest.load(self.run_dir.manifest_path)
        if ONNX_FILE not in manifest.files:
            raise ArtifactError(f"{self.run_dir.export_dir}: no verified {ONNX_FILE}; "
                                "run `mmdeploy export` first")
        manifest.verify_files(self.run_dir.export_dir,
                              [n for n in manifest.files if n.startswith(ONNX_FILE)])
        batch = manifest.extra.get("batch_range", {})
        self.batch_range = (batch.get("min", 1), batch.get("max"))
        self.session = OnnxSession(self.run_dir.export_dir / ONNX_FILE, threads)

    def describe(self) -> str:
        return f"onnxruntime ({self.session.provider})"

    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return self.session(pixel_values)
