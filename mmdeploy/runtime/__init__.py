"""Runtime backends behind one `Predictor` interface, and the choice among them.

`BACKEND_TABLE` mirrors the exporters' `FORMATS`: each backend says the devices it runs on,
the export record it serves at each precision, why it cannot run on a device here, and how
its predictor loads. `RANKING` follows from it, DESIGN section 7's order, fastest first:
TensorRT > ONNX Runtime on CUDA > AOTInductor on CUDA > ONNX Runtime on CPU > AOTInductor on
CPU > PyTorch eager. A backend is passed over when the run has no verified export for it
(said once per backend) or when this machine cannot run it on that device (said per device).
`RANKING` is the fallback: which is fastest depends on the model, the batch and the
machine, so where the export records hold timings made on this machine's device model
(`export --format auto`, `bench --record`), the fastest of those serves instead.

Precision: FP32 by default (an export's own precision: an FP16 engine serves "fp32"
requests too); INT8 (`precision="int8"`) is the run's INT8 record, which only ONNX Runtime
serves, and only once it passed its accuracy gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# Kept light (no torch): the CLI reads BACKENDS for `infer --backend` at import time.
from ..artifacts import ExportRecord, Manifest, RecordedTiming, RunDir
from ..errors import ArtifactError, BackendUnavailableError, ConfigError, MmdeployError
from .records import EXPORT_HINTS, SERVING_PRECISIONS

if TYPE_CHECKING:
    from .base import Predictor

Problem = Callable[[str, ExportRecord, RunDir], "str | None"]
Loader = Callable[[Path, str, "int | None"], "Predictor"]
Candidate = tuple[str, "str | None"]  # (backend, device); torch's device is None


def _onnxruntime_problem(device: str, record: ExportRecord, run_dir: RunDir) -> str | None:
    from .onnxruntime import GPU_HINT, available_providers, choose_providers

    try:
        available = available_providers()
    except BackendUnavailableError as exc:
        return exc.reason
    if device == "cuda" and record.precision == "int8":
        return "INT8 graphs are served on the CPU provider"
    if device == "cuda" and "CUDAExecutionProvider" not in choose_providers(
            available, tensorrt_importable=False).providers:
        return f"this onnxruntime has no CUDA provider ({GPU_HINT})"
    return None


def _aoti_problem(device: str, record: ExportRecord, run_dir: RunDir) -> str | None:
    from .aoti import device_problem

    if record.device != device:
        return f"{record.main_file} is compiled for {record.device}, not {device}"
    return device_problem(device)


def _tensorrt_problem(device: str, record: ExportRecord, run_dir: RunDir) -> str | None:
    from .tensorrt import EngineSidecar, runtime_info, unavailable_reason

    if reason := unavailable_reason():
        return reason
    try:
        sidecar = EngineSidecar.load(run_dir.export_dir / record.details["sidecar"])
        sidecar.check_compatible(runtime_info())
    except MmdeployError as exc:
        return str(exc)
    return None


def _load_tensorrt(run_path: Path, precision: str, threads: int | None) -> Predictor:
    from .tensorrt import TensorRTPredictor

    return TensorRTPredictor(run_path)


def _load_onnxruntime(run_path: Path, precision: str, threads: int | None) -> Predictor:
    from .onnxruntime import OnnxRuntimePredictor

    return OnnxRuntimePredictor(run_path, threads, precision)


def _load_aoti(run_path: Path, precision: str, threads: int | None) -> Predictor:
    from .aoti import AotiPredictor

    return AotiPredictor(run_path)


def _load_torch(run_path: Path, precision: str, threads: int | None) -> Predictor:
    from .torch import TorchPredictor

    return TorchPredictor(run_path)


@dataclass(frozen=True)
class Backend:
    """A runtime backend: the devices it runs on, the export record it serves at each
    precision (none: the run's own weights), why it cannot serve a record on a device here
    (`problem`: None when it can), and how to load its predictor (imported only then)."""

    name: str
    devices: tuple[str, ...]
    load: Loader
    records: dict[str, str] = field(default_factory=dict)
    problem: Problem | None = None

    def record_for(self, precision: str) -> str | None:
        return self.records.get(precision)


BACKEND_TABLE: dict[str, Backend] = {
    "tensorrt": Backend("tensorrt", ("cuda",), _load_tensorrt, {"fp32": "tensorrt"},
                        _tensorrt_problem),
    "onnxruntime": Backend("onnxruntime", ("cuda", "cpu"), _load_onnxruntime,
                           {"fp32": "onnx", "int8": "int8"}, _onnxruntime_problem),
    "aoti": Backend("aoti", ("cuda", "cpu"), _load_aoti, {"fp32": "aoti"}, _aoti_problem),
    "torch": Backend("torch", ("any",), _load_torch),
}
BACKENDS = tuple(BACKEND_TABLE)
RANKING = tuple([(b.name, device) for device in ("cuda", "cpu")
                 for b in BACKEND_TABLE.values() if device in b.devices] + [("torch", None)])


NO_EXPORT = "the run has no export (run `mmdeploy export --format onnx`)"


def _manifest(run_dir: RunDir) -> Manifest | str:
    """The run's manifest, or why there is none to use (none yet, or one this version cannot
    read: its line says to re-export)."""
    if not run_dir.manifest_path.exists():
        return NO_EXPORT
    try:
        return Manifest.load(run_dir.manifest_path)
    except ArtifactError as exc:
        return str(exc)


def _artifact_reason(backend: Backend, precision: str, manifest: Manifest | str) -> str | None:
    """Why the run has nothing for `backend` to serve at `precision`, or None."""
    if backend.name == "torch":
        return None
    if isinstance(manifest, str):
        return manifest
    name = backend.record_for(precision)
    record = manifest.exports.get(name)
    if record is None:
        return f"the run has no verified {EXPORT_HINTS[name]}"
    if not record.passed:
        return f"{record.main_file} did not pass its {record.check.get('kind', 'check')}"
    return None


def _reasons(backend: str, device: str | None, precision: str, run_dir: RunDir,
             manifest: Manifest | str) -> tuple[str | None, bool]:
    """(why `backend` on `device` cannot serve the run (`manifest`: see `_manifest`) at
    `precision`, or None; whether the reason is about the run's files, not the device)."""
    if backend not in BACKEND_TABLE:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    table = BACKEND_TABLE[backend]
    if reason := _artifact_reason(table, precision, manifest):
        return reason, True
    if table.problem is None:
        return None, False
    return table.problem(device, manifest.exports[table.record_for(precision)], run_dir), False


def default_precision(run_path: str | Path) -> str:
    """"int8" when the run's INT8 export was made to be served by default
    (`export --int8 ... --serve-int8`) and passed its gate, else "fp32"."""
    manifest = _manifest(RunDir(Path(run_path)))
    record = None if isinstance(manifest, str) else manifest.record("int8")
    return "int8" if record is not None and record.details.get("serve_default") else "fp32"


def pick_backend(run_path: str | Path, requested: str | None = None,
                 precision: str = "fp32") -> tuple[str, list[str]]:
    """The backend to use and, for each one passed over, why (once per backend for a
    missing export, once per device for what this machine lacks). With `precision="int8"`
    only backends with an INT8 record are candidates (onnxruntime).

    The fastest per image among the candidates timed on this machine's device model (the
    export records' `timings`, made by `export --format auto` or `bench --record`) wins;
    each other candidate timed here is passed over with both timings, each untimed one
    ranked above it as not timed here, and timings made on another device model are
    ignored (said once). Without timings for this machine, the first candidate in `RANKING`.
    """
    if precision not in SERVING_PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from "
                          f"{', '.join(SERVING_PRECISIONS)}")
    run_dir = RunDir(Path(run_path))
    manifest = _manifest(run_dir)  # read once for every candidate
    ranking = [(b, d) for b, d in RANKING
               if precision == "fp32" or BACKEND_TABLE[b].record_for(precision)]
    if requested is not None:
        return requested, _check_requested(requested, ranking, precision, run_dir, manifest)
    skipped = [] if precision == "fp32" else \
        [f"other backends: {precision.upper()} is served by {_served_by(ranking)} only"]
    # Timings are compared only when some record has one: every candidate is checked then.
    timed = not isinstance(manifest, str) and any(r.timings for r in manifest.exports.values())
    available, reasons = [], {}
    for backend, device in ranking:
        reason, about_files = _reasons(backend, device, precision, run_dir, manifest)
        if reason is None:
            available.append((backend, device))
            if not timed:
                break
        else:
            reasons[backend, device] = (f"{backend}: {reason}" if about_files
                                        else f"{backend} on {device}: {reason}")
    if not available:  # no fallback: the run's own weights are not INT8
        raise BackendUnavailableError(ranking[0][0], f"{precision}: {reason}")
    here, stale = _timings_here(available, precision, manifest) if timed else ({}, None)
    chosen = min(here, key=lambda c: here[c].ms_per_image) if here else available[0]
    skipped += [stale] if stale else []
    rank = ranking.index(chosen)
    for position, candidate in enumerate(ranking):
        if candidate in here and candidate != chosen:
            line = _slower_line(candidate, chosen, here)
        elif position < rank:  # unavailable, or (chosen by timing) available but untimed
            line = reasons.get(candidate) or _untimed_line(candidate, chosen, here[chosen])
        else:
            continue
        if line not in skipped:
            skipped.append(line)
    return chosen[0], skipped


def _timings_here(available: list[Candidate], precision: str,
                  manifest: Manifest) -> tuple[dict[Candidate, RecordedTiming], str | None]:
    """The timing of each available candidate made on the model of its device here, and a
    line about the first timing made on another model, if any."""
    from .timing import device_name

    here, stale, names = {}, None, {}
    for backend, device in available:
        if backend == "torch":  # the run's own weights: never timed
            continue
        record = manifest.exports[BACKEND_TABLE[backend].record_for(precision)]
        on_device = [t for t in record.timings if t.device == device]
        if not on_device:
            continue
        name = names.setdefault(device, device_name(device))
        if (timing := record.timing(device, name)) is not None:
            here[backend, device] = timing
        elif stale is None:
            stale = (f"timings made on another {device} ({on_device[0].device_name!r}; this "
                     f"machine has {name!r})")
    return here, stale


def _slower_line(candidate: Candidate, chosen: Candidate,
                 here: dict[Candidate, RecordedTiming]) -> str:
    (backend, device), timing, best = candidate, here[candidate], here[chosen]
    return (f"{backend} on {device}: {_timed(timing)} here; {chosen[0]} on {chosen[1]} took "
            f"{_timed(best)}, the fastest per image of the {len(here)} timed here")


def _untimed_line(candidate: Candidate, chosen: Candidate, best: RecordedTiming) -> str:
    return (f"{candidate[0]} on {candidate[1]}: not timed on this machine, {chosen[0]} on "
            f"{chosen[1]} was ({_timed(best)}); `mmdeploy bench RUN --record` times both")


def _timed(timing: RecordedTiming) -> str:
    return f"{timing.median_ms:.2f} ms at batch {timing.batch}"


def _check_requested(requested: str, ranking: list[tuple[str, str | None]], precision: str,
                     run_dir: RunDir, manifest: Manifest | str) -> list[str]:
    """Nothing skipped when `requested` can serve the run at `precision` on one of its
    devices; else `BackendUnavailableError` with the reasons."""
    candidates = [(b, d) for b, d in ranking if b == requested]
    if not candidates and requested in BACKEND_TABLE:
        raise BackendUnavailableError(requested, f"{precision.upper()} is served by "
                                      f"{_served_by(ranking)} only; leave --backend out")
    reasons = []
    for backend, device in candidates or [(requested, None)]:
        reason, _ = _reasons(backend, device, precision, run_dir, manifest)
        if reason is None:
            return []
        reasons.append(f"{device}: {reason}" if device and len(candidates) > 1 else reason)
    prefix = f"{precision}: " if precision != "fp32" else ""
    raise BackendUnavailableError(requested, prefix + "; ".join(dict.fromkeys(reasons)))


def _served_by(ranking: list[tuple[str, str | None]]) -> str:
    return ", ".join(dict.fromkeys(backend for backend, _ in ranking))


def load_predictor(run_path: str | Path, backend: str, precision: str = "fp32",
                   threads: int | None = None) -> Predictor:
    """The run's predictor on `backend`. `threads`: ONNX Runtime's intra-op threads (None:
    one per core), for several predictors sharing a machine's cores."""
    if backend not in BACKEND_TABLE:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    table = BACKEND_TABLE[backend]
    if precision != "fp32" and table.record_for(precision) is None:
        raise BackendUnavailableError(backend, f"{precision} is served by onnxruntime only")
    return table.load(Path(run_path), precision, threads)


__all__ = ["BACKENDS", "BACKEND_TABLE", "RANKING", "default_precision", "load_predictor",
           "pick_backend"]
