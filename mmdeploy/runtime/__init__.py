"""Runtime backends behind one `Predictor` interface, and the choice among them."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import Manifest, RunDir
from ..errors import BackendUnavailableError, ConfigError
from .base import Predictor

BACKENDS = ("onnxruntime", "torch")  # fastest first


def _unavailable_reason(backend: str, run_dir: RunDir) -> str | None:
    """Why `backend` cannot serve this run, or None if it can."""
    if backend == "torch":
        return None
    if backend == "onnxruntime":
        from .onnxruntime import ONNX_FILE, available_providers

        try:
            available_providers()
        except BackendUnavailableError as exc:
            return exc.reason
        if not run_dir.manifest_path.exists():
            return "the run has no export (run `mmdeploy export --format onnx`)"
        manifest = Manifest.load(run_dir.manifest_path)
        if "onnxruntime" not in manifest.parity or ONNX_FILE not in manifest.files:
            return "the run has no verified ONNX export"
        return None
    raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def pick_backend(run_path: str | Path, requested: str | None = None) -> tuple[str, list[str]]:
    """The backend to use and, for each faster one passed over, why."""
    run_dir = RunDir(Path(run_path))
    if requested is not None:
        reason = _unavailable_reason(requested, run_dir)
        if reason is not None:
            raise BackendUnavailableError(requested, reason)
        return requested, []
    skipped = []
    for backend in BACKENDS:
        reason = _unavailable_reason(backend, run_dir)
        if reason is None:
            return backend, skipped
        skipped.append(f"{backend}: {reason}")
    raise AssertionError("torch is always available")


def load_predictor(run_path: str | Path, backend: str) -> Predictor:
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimePredictor

        return OnnxRuntimePredictor(run_path)
    from .torch import TorchPredictor

    return TorchPredictor(run_path)


__all__ = ["BACKENDS", "Predictor", "load_predictor", "pick_backend"]
