"""Runtime backends behind one `Predictor` interface, and the choice among them.

DESIGN section 7's order, fastest first: TensorRT > ONNX Runtime on CUDA > AOTInductor on
CUDA > ONNX Runtime on CPU > AOTInductor on CPU > PyTorch eager. A backend is passed over
when the run has no verified export for it (said once per backend) or when this machine
cannot run it on that device (said per device).

Precision: FP32 by default; INT8 (`precision="int8"`) is the run's `model.int8.onnx`, which
only ONNX Runtime serves, and only once it passed its accuracy gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

# Kept light (no torch): the CLI reads BACKENDS for `infer --backend` at import time.
from ..errors import ArtifactError, BackendUnavailableError, ConfigError, MmdeployError

if TYPE_CHECKING:
    from ..artifacts import Manifest, RunDir
    from .base import Predictor

BACKENDS = ("tensorrt", "onnxruntime", "aoti", "torch")
RANKING = (("tensorrt", "cuda"), ("onnxruntime", "cuda"), ("aoti", "cuda"),
           ("onnxruntime", "cpu"), ("aoti", "cpu"), ("torch", None))


def _manifest(run_dir: RunDir) -> Manifest | None:
    from ..artifacts import Manifest

    if not run_dir.manifest_path.exists():
        return None
    try:
        return Manifest.load(run_dir.manifest_path)
    except ArtifactError:
        return None


def _artifact_reason(backend: str, manifest: Manifest | None) -> str | None:
    """Why the run has nothing for `backend` to serve, or None."""
    from .aoti import package_info
    from .onnxruntime import ONNX_FILE
    from .tensorrt import recorded_engine

    if backend == "torch":
        return None
    if manifest is None:
        return "the run has no export (run `mmdeploy export --format onnx`)"
    if backend == "onnxruntime" and ("onnxruntime" not in manifest.parity
                                     or ONNX_FILE not in manifest.files):
        return "the run has no verified ONNX export"
    if backend == "aoti" and package_info(manifest) is None:
        return "the run has no verified AOTInductor package (`export --format aoti`)"
    if backend == "tensorrt" and recorded_engine(manifest) is None:
        return "the run has no verified TensorRT engine (`export --format tensorrt`)"
    return None


def _device_reason(backend: str, device: str | None, run_dir: RunDir,
                   manifest: Manifest) -> str | None:
    """Why `backend` cannot run the run's export on `device` here, or None."""
    if backend == "tensorrt":
        from .tensorrt import EngineSidecar, recorded_engine, runtime_info, unavailable_reason

        if reason := unavailable_reason():
            return reason
        sidecar = run_dir.export_dir / recorded_engine(manifest)["sidecar"]
        try:
            EngineSidecar.load(sidecar).check_compatible(runtime_info())
        except MmdeployError as exc:
            return str(exc)
        return None
    if backend == "onnxruntime":
        from .onnxruntime import available_providers, choose_providers

        try:
            available = available_providers()
        except BackendUnavailableError as exc:
            return exc.reason
        if device == "cuda" and "CUDAExecutionProvider" not in choose_providers(
                available, tensorrt_importable=False).providers:
            return "this onnxruntime has no CUDA provider (pip install 'mm-peft-deploy[gpu]')"
        return None
    if backend == "aoti":
        from .aoti import device_problem, package_info

        compiled_for = package_info(manifest)["device"]
        if compiled_for != device:
            return f"model.pt2 is compiled for {compiled_for}, not {device}"
        return device_problem(device)
    return None


def _reasons(backend: str, device: str | None, run_dir: RunDir) -> tuple[str | None, bool]:
    """(why `backend` on `device` cannot serve the run or None, whether the reason is about
    the run's files rather than the device)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    manifest = _manifest(run_dir)
    if reason := _artifact_reason(backend, manifest):
        return reason, True
    return _device_reason(backend, device, run_dir, manifest), False


def default_precision(run_path: str | Path) -> str:
    """"int8" when the run's INT8 export was made to be served by default
    (`export --int8 ... --serve-int8`) and passed its gate, else "fp32"."""
    from ..artifacts import RunDir
    from .onnxruntime import int8_problem

    manifest = _manifest(RunDir(Path(run_path)))
    if manifest is None or int8_problem(manifest):
        return "fp32"
    return "int8" if manifest.extra["int8"].get("serve_default") else "fp32"


def _pick_int8(run_dir: RunDir, requested: str | None) -> tuple[str, list[str]]:
    from .onnxruntime import int8_problem

    if requested not in (None, "onnxruntime"):
        raise BackendUnavailableError(requested, "INT8 is served by onnxruntime only "
                                      "(model.int8.onnx); leave --backend out")
    reason = int8_problem(_manifest(run_dir))
    if reason is None:
        reason, _ = _reasons("onnxruntime", "cpu", run_dir)
    if reason is not None:
        raise BackendUnavailableError("onnxruntime", f"int8: {reason}")
    skipped = [] if requested else ["other backends: INT8 is served by onnxruntime only"]
    return "onnxruntime", skipped


def pick_backend(run_path: str | Path, requested: str | None = None,
                 precision: str = "fp32") -> tuple[str, list[str]]:
    """The backend to use and, for each faster one passed over, why (once per backend for a
    missing export, once per device for what this machine lacks). With `precision="int8"`
    that is onnxruntime, or an error saying why it cannot serve the run's INT8 graph."""
    from ..artifacts import RunDir

    run_dir = RunDir(Path(run_path))
    if precision == "int8":
        return _pick_int8(run_dir, requested)
    if precision != "fp32":
        raise ConfigError(f"unknown precision {precision!r}; choose fp32 or int8")
    if requested is not None:
        candidates = [(b, d) for b, d in RANKING if b == requested] or [(requested, None)]
        reasons = []
        for backend, device in candidates:
            reason, _ = _reasons(backend, device, run_dir)
            if reason is None:
                return requested, []
            reasons.append(f"{device}: {reason}" if device and len(candidates) > 1 else reason)
        raise BackendUnavailableError(requested, "; ".join(dict.fromkeys(reasons)))
    skipped: list[str] = []
    for backend, device in RANKING:
        reason, about_files = _reasons(backend, device, run_dir)
        if reason is None:
            return backend, skipped
        line = f"{backend}: {reason}" if about_files else f"{backend} on {device}: {reason}"
        if line not in skipped:
            skipped.append(line)
    raise AssertionError("torch is always available")


def load_predictor(run_path: str | Path, backend: str, precision: str = "fp32",
                   threads: int | None = None) -> Predictor:
    """The run's predictor on `backend`. `threads`: ONNX Runtime's intra-op threads (None:
    one per core), for several predictors sharing a machine's cores."""
    if precision != "fp32" and backend != "onnxruntime":
        raise BackendUnavailableError(backend, f"{precision} is served by onnxruntime only")
    if backend == "tensorrt":
        from .tensorrt import TensorRTPredictor

        return TensorRTPredictor(run_path)
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimePredictor

        return OnnxRuntimePredictor(run_path, threads, precision)
    if backend == "aoti":
        from .aoti import AotiPredictor

        return AotiPredictor(run_path)
    if backend == "torch":
        from .torch import TorchPredictor

        return TorchPredictor(run_path)
    raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "RANKING", "default_precision", "load_predictor", "pick_backend"]
