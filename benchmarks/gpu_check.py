"""One command that checks the whole GPU path with what this machine has, in minutes.

    python benchmarks/gpu_check.py --out OUT            # on a CUDA machine (OUT: a folder)
    python benchmarks/gpu_check.py --out OUT --dry-run  # the same code on CPU at tiny size

Runs from a plain copy of the repository (it puts the repository root on sys.path itself;
no `pip install`), with torch, transformers, onnx, onnxruntime and torch_geometric; every
other package is optional and a step that needs a missing one says "not installed: X".
Nothing reaches the network (HF_HUB_OFFLINE=1; the backbones are built from configs).

Steps, the most telling first (`STEPS`): the environment; torch's matmul peak on the device
(FP32, TF32, BF16, FP16, in this process); a tiny HMMoE run trained a few steps (bf16
autocast on CUDA), interrupted after a checkpoint and resumed to the same weights; a
ViT-B/16-sized run (random weights, `mmdeploy.bench.vit_b16`) of HMMoE trained a few steps,
then its deploy form as eager FP32 (the reference), eager FP16, AOTInductor FP16,
`torch.compile` FP16 and AOTInductor FP32, each checked for parity against eager FP32 at
DESIGN's tolerances and timed at B = 1, 8, 64, 256; the same tiny training for GA-Net; the
project's own `export` + `verify` on the tiny run; ONNX Runtime CUDA and TensorRT rows when
their packages import; then GA-Net at ViT-B/16 size, and `torch.compile` FP32 last.

Each timing row has the bench's host-to-host timing (`mmdeploy.bench.backends.measure`:
numpy pixels in, numpy outputs out) and, for the torch-run backends, a device-resident one
(pixels already on the device, CUDA synchronized before the clock starts and after each
call); speed-ups against eager FP32 at the same batch on both bases; achieved TFLOP/s (the
deploy form's FLOPs per image, counted by `torch.utils.flop_counter.FlopCounterMode`, times
images/s) and its share of the peak of the row's precision. The targets (`TARGETS`):
compiled FP16 at >= 3x eager FP32 at B=64, and at >= 40% of the FP16 matmul peak at B=256.

Everything goes to OUT/gpu_check.json (rewritten atomically when a step starts and after
every step and timing row, so a cut run still leaves its figures) and OUT/gpu_check.log.
A step that raises is recorded (the error's first line in the JSON, the traceback in the
log) and the next one runs. A step starts only while its least time fits before
`--deadline` (default 420 s after start); at `--hard-limit` (470 s) the running step is
marked "cut", the JSON written and the process ends, so the check stays under 8 minutes.
Exit status: 0 when no step errored and every parity check passed, 1 otherwise, 3 when cut.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
# The stage folders that `mmdeploy.<name>` maps to (links in the tree, package-dir in a wheel).
STAGES = ("models", "trainers", "exporters", "apps", "inference", "bench")
SCHEMA = "mmdeploy-gpu-check/1"
HALF = "fp16"
TARGETS = {
    "speedup": {"what": "compiled FP16 (torch.compile, AOTInductor, TensorRT) over eager FP32",
                "at_least": 3.0},
    "peak_share": {"what": "compiled FP16 share of the measured FP16 matmul peak",
                   "at_least": 0.40},
}
COMPILED = ("compile", "aoti", "tensorrt")
PACKAGES = ("torch", "transformers", "torch_geometric", "onnx", "onnxruntime",
            "onnxruntime-gpu", "onnxscript", "onnxslim", "tensorrt", "triton", "pillow",
            "safetensors", "huggingface_hub", "numpy", "click", "rich", "gradio")


class Skip(Exception):  # noqa: N818 - a step's outcome, not an error
    """The step cannot or need not run here; the message says why."""


class NotInstalled(Skip):
    def __init__(self, package: str, detail: str = ""):
        super().__init__(f"not installed: {package}" + (f" ({detail})" if detail else ""))


class _Interrupted(Exception):  # noqa: N818
    def __init__(self, step: int):
        super().__init__(f"interrupted after the checkpoint of step {step}")
        self.step = step


# ---------------------------------------------------------------------------- settings


@dataclass
class Settings:
    dry_run: bool
    device: str
    batches: tuple[int, ...]
    parity_batches: tuple[int, ...]  # batch 1, an odd batch, the largest
    target_batches: dict[str, int]  # the batch each target is read at
    big_backbone: str  # "vit-b16", or "tiny" in a dry run
    train_steps: int = 4
    resume_at: int = 2
    warmup: int = 2
    timing_s: float = 1.0  # about this long per timed measurement
    min_iters: int = 3
    max_iters: int = 30
    peak_size: int = 8192
    peak_iters: int = 10
    compile_backend: str = "inductor"
    export_batch_max: int = 8
    deadline_s: float = 420.0
    hard_limit_s: float = 470.0


def settings_for(dry_run: bool, deadline: float | None, hard_limit: float | None) -> Settings:
    if dry_run:
        # torch.compile(backend="eager") traces with dynamo like the real one but skips
        # Inductor's C++ code generation (about 40 s a compile on 2 CPU cores); the one
        # AOTInductor package of a dry run compiles for real.
        settings = Settings(
            dry_run=True, device="cpu", batches=(1, 2), parity_batches=(1, 2),
            target_batches={"speedup": 2, "peak_share": 2}, big_backbone="tiny", warmup=1,
            timing_s=0.05, min_iters=2, max_iters=3, peak_size=256, peak_iters=3,
            compile_backend="eager", export_batch_max=3, deadline_s=900.0, hard_limit_s=1200.0)
    else:
        settings = Settings(
            dry_run=False, device="cuda", batches=(1, 8, 64, 256), parity_batches=(1, 7, 256),
            target_batches={"speedup": 64, "peak_share": 256}, big_backbone="vit-b16")
    if deadline is not None:
        settings.deadline_s = deadline
    if hard_limit is not None:
        settings.hard_limit_s = hard_limit
    return settings


# ---------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class Step:
    """One check: `run(check, figures)` fills `figures` (the JSON is rewritten whenever it
    calls `check.write()`) and may raise Skip/NotInstalled. `needs`: steps that must have
    passed; `min_s`: the least seconds it takes on a GPU (not started with fewer left);
    `missing`: says quickly, before the budget is looked at, what is not installed;
    `dry`: None to run in a dry run too, else why a dry run leaves it out."""

    name: str
    run: Callable[[Check, dict], Any]
    needs: tuple[str, ...] = ()
    min_s: float = 0.0
    missing: Callable[[Check], str | None] | None = None
    dry: str | None = None


class Check:
    """The steps' shared state, the log and the JSON."""

    def __init__(self, out: Path, work: Path, settings: Settings, steps: list[Step]):
        self.out, self.work, self.settings = out, work, settings
        self.json_path, self.log_path = out / "gpu_check.json", out / "gpu_check.log"
        out.mkdir(parents=True, exist_ok=True)
        self.steps: dict[str, dict] = {s.name: {"status": "pending"} for s in steps}
        self.state: dict[str, Any] = {}
        self.status = "running"
        self.only: set[str] = set()  # --only: run these steps alone
        self.current: str | None = None
        self.created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.exit = os._exit  # what `cut` ends the process with (a test replaces it)
        self._lock = threading.RLock()
        self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - open for the run

    def elapsed(self) -> float:
        return time.monotonic() - STARTED

    def remaining(self) -> float:
        return self.settings.deadline_s - self.elapsed()

    def log(self, message: str) -> None:
        for line in str(message).splitlines() or [""]:
            text = f"[{self.elapsed():7.1f}s] {line}"
            print(text, flush=True)
            with self._lock:
                self._log.write(text + "\n")

    def document(self) -> dict:
        return {
            "schema": SCHEMA, "created": self.created, "host": platform.node(),
            "status": self.status, "elapsed_s": round(self.elapsed(), 1),
            "dry_run": self.settings.dry_run, "settings": dataclasses.asdict(self.settings),
            "targets": TARGETS, "summary": summarize(self.steps, self.settings),
            "steps": self.steps,
        }

    def write(self) -> None:
        with self._lock:
            text = json.dumps(_clean(self.document()), indent=1, default=_json_default)
            temporary = self.json_path.with_name(f".{self.json_path.name}.{os.getpid()}.tmp")
            temporary.write_text(text + "\n")
            os.replace(temporary, self.json_path)

    def cut(self, why: str) -> None:
        """Mark the running step cut, write the JSON and end the process (exit status 3)."""
        with self._lock:
            if self.current is not None:
                entry = self.steps[self.current]
                entry.update(status="cut", reason=why,
                             seconds=round(self.elapsed() - entry.get("started_s", 0), 1))
            for entry in self.steps.values():
                if entry["status"] == "pending":
                    entry.update(status="skipped", reason=f"not reached: {why}")
            self.status = "cut"
            self.log(f"CUT: {why}")
            for _ in range(3):  # the main thread may be changing a figure meanwhile
                try:
                    self.write()
                    break
                except RuntimeError:
                    time.sleep(0.05)
        self.exit(3)

    # -- running ------------------------------------------------------------------------
    def run(self, steps: list[Step]) -> None:
        for step in steps:
            self.run_step(step)
        self.status = "done"
        self.write()

    def run_step(self, step: Step) -> None:
        entry = self.steps[step.name]
        reason = self._skip_reason(step)
        if reason is not None:
            entry.update(status="not_installed" if reason.startswith("not installed")
                         else "skipped", reason=reason)
            self.log(f"{step.name}: {entry['status']}: {reason}")
            self.write()
            return
        figures: dict = {}
        started = self.elapsed()
        entry.update(status="running", started_s=round(started, 1), figures=figures)
        self.current = step.name
        self.log(f"== {step.name} ({self.remaining():.0f} s of the budget left)")
        self.write()
        _reset_cuda_peak()
        try:
            step.run(self, figures)
            entry["status"] = "ok"
        except Skip as exc:
            entry.update(status="not_installed" if isinstance(exc, NotInstalled)
                         else "skipped", reason=str(exc))
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] == "mmdeploy":
                self._record_error(entry, exc)
            else:
                entry.update(status="not_installed", reason=f"not installed: {exc.name}")
        except Exception as exc:  # one step's failure never stops the check
            self._record_error(entry, exc)
        finally:
            with self._lock:
                self.current = None
                entry["seconds"] = round(self.elapsed() - started, 1)
                if (peak := _cuda_peak_mb()) is not None:
                    entry["cuda_peak_mb"] = peak
            _free_memory()
        detail = entry.get("reason") or entry.get("error") or ""
        self.log(f"{step.name}: {entry['status']} in {entry['seconds']} s"
                 + (f": {detail}" if detail else ""))
        self.write()

    def _skip_reason(self, step: Step) -> str | None:
        if self.only and step.name not in self.only:
            return "not in --only"
        if self.settings.dry_run and step.dry is not None:
            return f"dry run: {step.dry}"
        if step.missing is not None and (missing := step.missing(self)):
            return missing
        for need in step.needs:
            status = self.steps.get(need, {}).get("status")
            if status != "ok":
                return f"needs {need}, which is {status or 'unknown'}"
        if self.remaining() < step.min_s:
            return (f"budget: {max(self.remaining(), 0):.0f} s left before the deadline, the "
                    f"step needs about {step.min_s:.0f} s")
        return None

    def _record_error(self, entry: dict, exc: BaseException) -> None:
        lines = traceback.format_exc().rstrip().splitlines()
        entry.update(status="error", error=_one_line(exc), traceback_tail=lines[-8:])
        self.log("\n".join(lines))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _clean(value):
    """JSON-safe: non-finite floats as strings ("inf", "nan"), tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _json_default(value):
    if hasattr(value, "item"):  # numpy and torch scalars
        return _clean(value.item())
    if dataclasses.is_dataclass(value):
        return _clean(dataclasses.asdict(value))
    return str(value)


def summarize(steps: dict[str, dict], settings: Settings) -> dict:
    """What to read first: statuses, errors, every parity verdict, the targets."""
    statuses: dict[str, int] = {}
    for entry in steps.values():
        statuses[entry["status"]] = statuses.get(entry["status"], 0) + 1
    errors = {name: e["error"] for name, e in steps.items() if e["status"] == "error"}
    parity, targets = {}, []
    for name, entry in steps.items():
        figures = entry.get("figures") or {}
        if "parity" in figures:
            parity[name] = {k: figures["parity"][k] for k in ("passed", "criterion", "worst")}
        for export, record in (figures.get("exports") or {}).items():
            parity[f"{name}:{export}"] = {k: record.get(k) for k in
                                          ("passed", "criterion", "worst")}
        if (figures.get("backend") in COMPILED and figures.get("precision") == HALF
                and figures.get("rows")):
            targets += _target_rows(name, figures, settings)
    return {
        "statuses": statuses,
        "errors": errors,
        "parity_all_passed": all(p["passed"] for p in parity.values()) if parity else None,
        "parity": parity,
        "targets": targets,
        "targets_meaningful": not settings.dry_run,  # CPU figures of a dry run mean nothing
    }


def _target_rows(step: str, figures: dict, settings: Settings) -> list[dict]:
    rows = {row["batch"]: row for row in figures.get("rows", [])}
    found = []
    for target, key in (("speedup", "speedup_vs_eager_fp32"), ("peak_share", "peak_share")):
        batch = settings.target_batches[target]
        row = rows.get(batch)
        basis = value = None
        if row is not None:
            for basis in ("device", "host"):
                value = (row.get(key) or {}).get(basis)
                if value is not None:
                    break
        bound = TARGETS[target]["at_least"]
        found.append({"target": target, "step": step, "batch": batch, "basis": basis,
                      "value": value, "at_least": bound,
                      "met": None if value is None else value >= bound})
    return found


# ---------------------------------------------------------------------------- helpers


def _bootstrap() -> None:
    """Make `import mmdeploy` work from a plain copy of the tree: the repository root first
    on sys.path, and each stage package (`mmdeploy.bench` -> bench/) registered from its
    top-level folder where the tree's links did not survive the copy."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the log
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import mmdeploy

    for stage in STAGES:
        name = f"mmdeploy.{stage}"
        if (ROOT / "mmdeploy" / stage / "__init__.py").exists() or name in sys.modules:
            continue
        init = ROOT / stage / "__init__.py"
        if not init.exists():
            continue
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(ROOT / stage)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(mmdeploy, stage, module)


def _distribution_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _runner(backend: str, device: str, precision: str, run: Callable):
    """The bench's `Runner`: host numpy in, host numpy out (imported late, as every project
    module here, so a missing package is reported by the step that needs it)."""
    from mmdeploy.runtime.timing import Runner

    return Runner(backend, device, precision, run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _reset_cuda_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak_mb() -> float | None:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- environment


def environment(check: Check, figures: dict) -> None:
    import torch

    figures["python"] = sys.version.split()[0]
    figures["platform"] = platform.platform()
    figures["cpu_cores"] = os.cpu_count()
    figures["torch_threads"] = torch.get_num_threads()
    figures["torch"] = torch.__version__
    figures["torch_cuda"] = torch.version.cuda
    figures["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1),
                          "multiprocessors": props.multi_processor_count,
                          "count": torch.cuda.device_count()}
        figures["cudnn"] = torch.backends.cudnn.version()
    figures["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    with contextlib.suppress(Exception):  # read only: the legacy flag, as torch reports it
        figures["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    figures["packages"] = {name: _distribution_version(name) or "not installed"
                           for name in PACKAGES}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        figures["onnxruntime_providers"] = onnxruntime.get_available_providers()
    figures["compilers"] = {name: shutil.which(name) for name in ("gcc", "g++", "cc", "nvcc")}
    figures["env"] = {name: os.environ.get(name) for name in
                      ("HF_HUB_OFFLINE", "MMDEPLOY_CACHE", "CUDA_VISIBLE_DEVICES",
                       "TORCHINDUCTOR_CACHE_DIR")}
    figures["work"] = str(check.work)


def matmul_peak(check: Check, figures: dict) -> None:
    from mmdeploy.bench.peak import measure_torch_peak

    settings = check.settings
    peak = measure_torch_peak(settings.device, settings.peak_size, settings.peak_iters)
    check.state["peak"] = peak.gflops
    figures.update(device=peak.device, size=peak.size, iters=peak.iters, gflops=peak.gflops,
                   how="torch.matmul(a, b, out=c) of two size-square matrices; fp32 with "
                       "TF32 off (torch's default), tf32 with it on; median of iters")
    check.log("matmul peak: " + ", ".join(f"{k} {v / 1e3:,.1f} TFLOP/s"
                                          for k, v in peak.gflops.items()))


# ---------------------------------------------------------------------------- training


@contextlib.contextmanager
def _autocast_probe(device: str):
    """Counts module forwards, and those that ran under autocast (with its dtype)."""
    import torch

    kind = "cuda" if device == "cuda" else "cpu"
    counts = {"forwards": 0, "under_autocast": 0, "dtypes": []}

    def hook(module, args, output):
        counts["forwards"] += 1
        if torch.is_autocast_enabled(kind):
            counts["under_autocast"] += 1
            dtype = str(torch.get_autocast_dtype(kind)).replace("torch.", "")
            if dtype not in counts["dtypes"]:
                counts["dtypes"].append(dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


@contextlib.contextmanager
def _interrupt_after(step: int):
    """Stop training (as a kill would) right after the checkpoint of `step` is on disk."""
    from mmdeploy.trainers import loop

    original = loop.save_checkpoint

    def save_then_stop(run_dir, model, optimizer, state, ewc):
        original(run_dir, model, optimizer, state, ewc)
        if state["step"] >= step:
            raise _Interrupted(state["step"])

    loop.save_checkpoint = save_then_stop
    try:
        yield
    finally:
        loop.save_checkpoint = original


def _train(check: Check, out: Path, adapter: str, spec: str, shots: int, batch_size: int):
    from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
    from mmdeploy.trainers.run import new_run, run_training

    data = DataConfig(source="demo", shots=shots, val_per_class=1, test_per_class=1)
    train = TrainConfig(epochs=1, max_steps=check.settings.train_steps, batch_size=batch_size,
                        checkpoint_every=check.settings.resume_at)
    prepared = new_run(out, adapter, {}, BackboneConfig(spec=spec), data, train,
                       overwrite=True)
    started = time.perf_counter()
    with _autocast_probe(check.settings.device) as autocast:
        result = run_training(prepared)
    check.log(f"trained {adapter} on {spec}: {result.steps} steps in "
              f"{time.perf_counter() - started:.1f} s {result.phase_seconds}, autocast in "
              f"{autocast['under_autocast']} of {autocast['forwards']} module forwards "
              f"{autocast['dtypes']}")
    return prepared, {
        "seconds": round(time.perf_counter() - started, 2), "steps": result.steps,
        "phase_seconds": result.phase_seconds, "test_accuracy": result.test_accuracy,
        "trainable_share": result.parameters.get("trainable_share"),
        "autocast": autocast,
    }


def train_resume(check: Check, figures: dict, adapter: str) -> None:
    """Train the tiny run a few steps; train it again, stopped after a checkpoint, and
    resume it: the resumed run must end with the uninterrupted run's weights."""
    from mmdeploy.artifacts import load_safetensors
    from mmdeploy.backbone import torch_device
    from mmdeploy.trainers.run import existing_run, run_training

    root = check.work / "runs" / f"tiny-{adapter}"
    figures["device"] = torch_device()
    whole, figures["train"] = _train(check, root / "whole", adapter, "tiny", 2, 4)
    check.state[f"tiny_{adapter}_run"] = whole.run_dir.root  # exported even if resume fails
    check.write()
    try:
        with _interrupt_after(check.settings.resume_at):
            _train(check, root / "cut", adapter, "tiny", 2, 4)
        raise RuntimeError("training ended before it could be interrupted")
    except _Interrupted as stop:
        interrupted = stop.step
    resumed = existing_run(root / "cut")
    result = run_training(resumed, resume=True)
    cut = resumed.run_dir
    expected = load_safetensors(whole.run_dir.weights_path)
    got = load_safetensors(cut.weights_path)
    gap = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    state = load_safetensors(cut.checkpoint_dir / "state.safetensors")
    figures["resume"] = {
        "interrupted_at_step": interrupted, "steps": result.steps,
        "weights_max_abs_diff": gap,
        "identical_weights": gap == 0.0 and set(expected) == set(got),
        "identical_metrics": (whole.run_dir.metrics_path.read_text()
                              == cut.metrics_path.read_text()),
        "rng_states_in_checkpoint": sorted(k for k in state if k.startswith("rng.")),
    }
    check.log(f"resumed from step {interrupted}: weights max abs difference {gap:.3g}, "
              f"metrics identical: {figures['resume']['identical_metrics']}")


def _big_spec(check: Check, figures: dict) -> str:
    if check.settings.big_backbone == "tiny":
        return "tiny"
    from mmdeploy.bench.vit_b16 import checkpoint_dir

    started = time.perf_counter()
    path = checkpoint_dir()
    figures["backbone_build_seconds"] = round(time.perf_counter() - started, 1)
    return str(path)


@dataclass
class Subject:
    """A trained run's deploy form on the device, with what every backend step shares:
    the parity cases and eager FP32's outputs on them, timing pixels, eager FP32's rows."""

    name: str
    run_path: Path
    deploy: Any
    device: str
    image_size: tuple[int, int]
    flops_per_image: int | None
    cases: list  # (kind, pixels) as `parity_inputs` makes them
    references: list  # eager FP32's outputs on each case (host numpy)
    batch_max: int
    eager_rows: dict[int, dict] = field(default_factory=dict)
    onnx_path: Path | None = None
    _pixels: dict = field(default_factory=dict)

    def pixels(self, batch: int):
        import numpy as np

        if batch not in self._pixels:
            rng = np.random.default_rng(batch)
            self._pixels[batch] = rng.standard_normal((batch, 3, *self.image_size),
                                                      dtype=np.float32)
        return self._pixels[batch]


def big_train(check: Check, figures: dict, adapter: str) -> None:
    """Build the ViT-B/16-sized backbone (random weights; the tiny one in a dry run), train
    the adapter a few steps, and prepare its deploy form on the device (the `Subject`)."""
    import torch

    from mmdeploy.exporters.parity import parity_inputs
    from mmdeploy.runs import load_model

    settings = check.settings
    spec = _big_spec(check, figures)
    figures["backbone"] = settings.big_backbone
    out = check.work / "runs" / f"big-{adapter}"
    _, figures["train"] = _train(check, out, adapter, spec, 4, 8)
    check.write()
    started = time.perf_counter()
    model, run = load_model(out)
    deploy = model.to_deploy()
    preprocessor = deploy.backbone.preprocessor
    image_size = tuple(preprocessor.image_size)
    cases = [(case.kind, case.inputs[0])
             for case in parity_inputs(run, preprocessor, list(settings.parity_batches), seed=0)]
    with torch.inference_mode():
        # The same FP32 deploy form on the CPU and on the device, at the small parity batches.
        small = [x for _, x in cases if len(x) <= 7] if settings.device != "cpu" else []
        on_cpu = [deploy(x) for x in small]
        deploy.to(settings.device).eval()
        gaps = [float((got.float().cpu() - want).abs().max())
                for x, expected in zip(small, on_cpu, strict=True)
                for got, want in zip(deploy(x.to(settings.device)), expected, strict=True)]
        if gaps:
            figures["cpu_vs_device_eager_fp32_max_abs"] = max(gaps)
        references = []
        for _, x in cases:
            logits, embeddings = deploy(x.to(settings.device))
            references.append({"logits": logits.float().cpu().numpy(),
                               "embeddings": embeddings.float().cpu().numpy()})
    flops = _count_flops(deploy, image_size, settings.device)
    subject = Subject(f"{settings.big_backbone}-{adapter}", out, deploy, settings.device,
                      image_size, flops, cases, references, max(settings.batches))
    check.state[f"big_{adapter}"] = subject
    figures["model"] = {
        "image_size": list(image_size), "gflops_per_image": flops and round(flops / 1e9, 3),
        "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode at batch 1",
        "parameters_m": round(sum(p.numel() for p in deploy.parameters()) / 1e6, 2),
        "deploy_seconds": round(time.perf_counter() - started, 1),
        "parity_cases": [[kind, len(x)] for kind, x in cases],
    }


def _count_flops(module, image_size: tuple[int, int], device: str) -> int | None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(torch.randn(1, 3, *image_size, device=device))
    return int(counter.get_total_flops()) or None


# ---------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """A backend ready to run one subject: `runner` (the bench's: host numpy in, host numpy
    out), and where torch runs it, `device_call` (a device tensor of `dtype` in)."""

    runner: Any
    device_call: Callable | None
    dtype: Any
    details: dict


def _torch_backend(check: Check, subject: Subject, backend: str, precision: str) -> Backend:
    """Eager or `torch.compile` (Inductor with freezing, as `mmdeploy bench` compiles; a dry
    run traces with dynamo only) of the deploy form at `precision`, as
    `mmdeploy.bench.backends.torch_runner` builds it, on a copy (the FP32 form is the
    reference)."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    module = subject.deploy
    if backend != "eager" or precision != "fp32":
        module = copy.deepcopy(module).to(dtype=dtype).eval()
    call, details = module, {}
    if backend == "compile":
        compiler = check.settings.compile_backend
        options = {"freezing": True} if compiler == "inductor" else None
        call = torch.compile(module, backend=compiler, options=options)
        details = {"compiler": compiler, "options": options}
    device = subject.device

    def device_call(x):
        with torch.inference_mode():
            return call(x)

    def run(pixels):
        with torch.inference_mode():
            logits, embeddings = call(torch.from_numpy(pixels).to(device=device, dtype=dtype))
            return {"logits": logits.float().cpu().numpy(),
                    "embeddings": embeddings.float().cpu().numpy()}

    return Backend(_runner(backend, device, precision, run), device_call, dtype, details)


def _aoti_backend(check: Check, subject: Subject, precision: str) -> Backend:
    """The deploy form compiled by the project's exporter into a `.pt2` package over batch
    1..max, loaded by the project's runtime."""
    import torch

    from mmdeploy.exporters.aoti import compile_aoti, fp16_problem
    from mmdeploy.runtime.aoti import AotiPackage

    if precision == "fp16" and (problem := fp16_problem(subject.device)):
        raise Skip(problem)
    folder = check.work / "aoti"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subject.name}-{precision}.pt2"
    details = compile_aoti(subject.deploy, path, subject.image_size, 1, subject.batch_max,
                           subject.device, precision)
    details["package_mb"] = round(path.stat().st_size / 2**20, 1)
    package = AotiPackage(path, subject.device, precision)

    def device_call(x):
        with torch.inference_mode():
            return package.runner(x)

    return Backend(_runner("aoti", subject.device, precision, package), device_call,
                   package.dtype, details)


def _onnx_missing(check: Check) -> str | None:
    for module, package in (("onnxscript", "onnxscript"), ("onnxslim", "onnxslim")):
        if importlib.util.find_spec(module) is None:
            return f"not installed: {package} (the ONNX export needs it)"
    return None


def _ort_missing(check: Check) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "not installed: onnxruntime"
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if check.settings.device == "cuda" and "CUDAExecutionProvider" not in providers:
        return (f"not installed: onnxruntime-gpu (this onnxruntime "
                f"{onnxruntime.__version__} has {', '.join(providers)})")
    return _onnx_missing(check)


def _tensorrt_missing(check: Check) -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "not installed: tensorrt"
    return _onnx_missing(check)


def _onnx_path(check: Check, subject: Subject) -> Path:
    """The subject's deploy form as ONNX (exported once, from a CPU copy, by the project's
    exporter: dynamo, opset 18, dynamic batch)."""
    if subject.onnx_path is None:
        from mmdeploy.exporters.onnx import export_onnx

        folder = check.work / "onnx" / subject.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        started = time.perf_counter()
        export_onnx(copy.deepcopy(subject.deploy).cpu(), path, subject.image_size, 1,
                    subject.batch_max, 18)
        check.log(f"exported {path} in {time.perf_counter() - started:.1f} s")
        subject.onnx_path = path
    return subject.onnx_path


def _ort_backend(check: Check, subject: Subject) -> Backend:
    from mmdeploy.runtime.onnxruntime import OnnxSession

    started = time.perf_counter()
    session = OnnxSession(_onnx_path(check, subject))
    if subject.device == "cuda" and not session.on_gpu:
        raise NotInstalled("a working ONNX Runtime CUDA provider",
                           f"the session fell back to {session.provider}")
    device = "cuda" if session.on_gpu else "cpu"
    return Backend(_runner("onnxruntime", device, "fp32", session), None, None,
                   {"provider": session.provider,
                    "export_and_load_seconds": round(time.perf_counter() - started, 1)})


def _tensorrt_backend(check: Check, subject: Subject) -> Backend:
    from mmdeploy.exporters.tensorrt import build_engine
    from mmdeploy.runtime.tensorrt import Profile, load_engine, unavailable_reason

    if reason := unavailable_reason():
        raise Skip(reason)
    onnx_path = _onnx_path(check, subject)
    folder = onnx_path.parent / "tensorrt"
    folder.mkdir(exist_ok=True)
    opt = check.settings.target_batches["speedup"]
    profile = Profile.for_batches(1, opt, subject.batch_max, subject.image_size)
    engine, sidecar, details = build_engine(onnx_path, folder, profile, HALF, check.log)
    return Backend(_runner("tensorrt", "cuda", HALF, load_engine(folder, engine, sidecar)),
                   None, None, details)


def backend_step(check: Check, figures: dict, adapter: str, backend: str,
                 precision: str) -> None:
    """Build one backend of the subject, check its parity against eager FP32 (DESIGN's
    criterion for its precision; torch paths under AOTInductor's), then time it at each
    batch size."""
    import torch

    from mmdeploy.exporters.parity import evaluate

    subject: Subject = check.state[f"big_{adapter}"]
    figures.update(kind="backend", subject=subject.name, backend=backend,
                   precision=precision, device=subject.device)
    started = time.perf_counter()
    if backend in ("eager", "compile"):
        built = _torch_backend(check, subject, backend, precision)
    elif backend == "aoti":
        built = _aoti_backend(check, subject, precision)
    elif backend == "onnxruntime":
        built = _ort_backend(check, subject)
    else:
        built = _tensorrt_backend(check, subject)
    figures.update(device=built.runner.device, details=built.details,
                   build_seconds=round(time.perf_counter() - started, 1))
    check.write()
    reference = backend == "eager" and precision == "fp32"
    if not reference:
        started = time.perf_counter()
        criterion_of = backend if backend in ("onnxruntime", "aoti", "tensorrt") else "aoti"
        cases = [(kind, len(x), expected, built.runner.run(x.numpy()))
                 for (kind, x), expected in zip(subject.cases, subject.references,
                                                strict=True)]
        report = evaluate(criterion_of, precision, cases)
        figures["parity"] = {
            "passed": report.passed, "against": "eager fp32 on the same device",
            "criterion": {"of": f"{criterion_of} {precision}",
                          **dataclasses.asdict(report.criterion)},
            "worst": report.worst,
            "checks": [{"inputs": c.inputs, "batch": c.batch, "passed": c.passed,
                        **{k: c.metrics.get(k) for k in ("max_abs", "min_cosine",
                                                         "top1_agreement")},
                        **({"problems": c.problems} if c.problems else {})}
                       for c in report.checks],
            # includes the first calls at each parity batch (torch.compile compiles here)
            "seconds": round(time.perf_counter() - started, 1),
        }
        check.write()
    figures["rows"] = []
    for batch in check.settings.batches:
        if check.remaining() < 0:
            figures["cut"] = f"deadline reached before batch {batch}"
            break
        row = _time_row(check, subject, built, batch)
        if reference:
            subject.eager_rows[batch] = row
        _compare(check, subject, figures["precision"], row)
        figures["rows"].append(row)
        check.log(_row_line(figures, row))
        check.write()
    if backend == "compile":
        torch._dynamo.reset()


def _time_row(check: Check, subject: Subject, built: Backend, batch: int) -> dict:
    import torch

    from mmdeploy.runtime.timing import measure

    settings = check.settings
    pixels = subject.pixels(batch)
    started = time.perf_counter()
    built.runner.run(pixels)
    first = time.perf_counter() - started
    iters = max(settings.min_iters, min(settings.max_iters,
                                        round(settings.timing_s / max(first, 1e-6))))
    row = {"batch": batch, "first_call_s": round(first, 4), "iters": iters,
           "host": dataclasses.asdict(measure(built.runner, pixels, settings.warmup, iters))}
    if built.device_call is not None:
        x = torch.from_numpy(pixels).to(device=subject.device, dtype=built.dtype)
        row["device"] = _device_timing(built.device_call, x, settings.warmup, iters)
        del x
    return row


def _device_timing(call: Callable, x, warmup: int, iters: int) -> dict:
    """Inputs already on the device; CUDA synchronized before the clock starts and after
    every call, so each time covers the whole of one call's work."""
    for _ in range(warmup):
        call(x)
    _sync()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        call(x)
        _sync()
        times.append((time.perf_counter() - started) * 1e3)
    median = statistics.median(times)
    return {"median_ms": round(median, 4), "min_ms": round(min(times), 4),
            "images_per_s": round(len(x) / median * 1e3, 2)}


def _compare(check: Check, subject: Subject, precision: str, row: dict) -> None:
    """Speed-ups over eager FP32 at the same batch, achieved TFLOP/s and the peak share."""
    eager = subject.eager_rows.get(row["batch"])
    speedup = {}
    for basis in ("host", "device"):
        if eager is not None and basis in row and basis in eager:
            speedup[basis] = round(eager[basis]["median_ms"] / row[basis]["median_ms"], 3)
    row["speedup_vs_eager_fp32"] = speedup
    if subject.flops_per_image is None:
        return
    peak = check.state.get("peak", {}).get(precision)
    achieved, share = {}, {}
    for basis in ("host", "device"):
        if basis in row:
            achieved[basis] = subject.flops_per_image * row[basis]["images_per_s"] / 1e12
            if peak:
                share[basis] = round(achieved[basis] * 1e3 / peak, 4)
            achieved[basis] = round(achieved[basis], 4)
    row["achieved_tflops"] = achieved
    row["peak_share"] = share


def _row_line(figures: dict, row: dict) -> str:
    timing = row.get("device") or row["host"]
    basis = "device" if "device" in row else "host"
    speedup = row.get("speedup_vs_eager_fp32", {}).get(basis)
    share = (row.get("peak_share") or {}).get(basis)
    return (f"  {figures['backend']} {figures['precision']} B={row['batch']}: "
            f"{timing['median_ms']:.3f} ms ({basis}), {timing['images_per_s']:,.0f} img/s"
            + (f", {speedup:.2f}x eager fp32" if speedup is not None else "")
            + (f", {share:.1%} of peak" if share is not None else ""))


# ---------------------------------------------------------------------------- export


def export_verify(check: Check, figures: dict) -> None:
    """The project's own `export` and `verify` on the tiny HMMoE run: ONNX (when its
    exporter's packages are here) and AOTInductor FP32, then AOTInductor FP16 on CUDA;
    each published only once it passed parity at DESIGN's tolerances."""
    from mmdeploy.config import ExportConfig
    from mmdeploy.errors import MmdeployError
    from mmdeploy.exporters.export import export_run
    from mmdeploy.exporters.verify import verify_run

    run = check.state.get("tiny_hmmoe_run")
    if run is None:
        raise Skip("needs the tiny HMMoE run of tiny_hmmoe_train_resume, which has none")
    settings = check.settings
    formats, left_out = [], {}
    if missing := _onnx_missing(check):
        left_out["onnx"] = missing
    else:
        formats.append("onnx")
    if settings.dry_run:
        left_out["aoti"] = ("dry run: one AOTInductor compile per dry run "
                            "(vitb16_hmmoe_aoti_fp32)")
    else:
        formats.append("aoti")
    figures["left_out"] = left_out
    if not formats:
        raise Skip("; ".join(f"{k}: {v}" for k, v in left_out.items()))
    plans = [(tuple(formats), False)]
    if "aoti" in formats and settings.device == "cuda":
        plans.append((("aoti",), True))
    figures["exports"], figures["verify"] = {}, []
    for fmts, fp16 in plans:
        config = ExportConfig(formats=fmts, batch_min=1, batch_opt=1,
                              batch_max=settings.export_batch_max, fp16=fp16)
        label = "+".join(fmts) + (" fp16" if fp16 else "")
        try:
            manifest = export_run(run, config, log=check.log)
        except MmdeployError as exc:  # a failed parity is kept aside: record it, go on
            figures["exports"][label] = {"passed": False, "error": _one_line(exc),
                                         "criterion": None, "worst": None}
            check.write()
            continue
        for name in fmts:
            record = manifest.exports[name]
            report = record.check or {}
            figures["exports"][f"{name} {record.precision}"] = {
                "passed": report.get("passed"), "device": record.device,
                "criterion": report.get("criterion"), "worst": report.get("worst"),
                "batch_range": record.batch_range}
        for report in verify_run(run, log=check.log):
            figures["verify"].append({"backend": report.backend,
                                      "precision": getattr(report, "precision", None),
                                      "passed": report.passed, "summary": report.summary()})
        check.write()


# ---------------------------------------------------------------------------- the steps


def _steps() -> list[Step]:
    def backend(adapter: str, name: str, precision: str, min_s: float, **kwargs) -> Step:
        return Step(f"vitb16_{adapter}_{name}_{precision}",
                    functools.partial(backend_step, adapter=adapter, backend=name,
                                      precision=precision),
                    needs=(f"vitb16_{adapter}_train",), min_s=min_s, **kwargs)

    once = "torch.compile runs once per dry run (vitb16_hmmoe_compile_fp16)"
    return [
        Step("environment", environment),
        Step("matmul_peak", matmul_peak, min_s=10),
        Step("tiny_hmmoe_train_resume", functools.partial(train_resume, adapter="hmmoe"),
             min_s=20),
        Step("vitb16_hmmoe_train", functools.partial(big_train, adapter="hmmoe"), min_s=45),
        backend("hmmoe", "eager", "fp32", 15),
        backend("hmmoe", "eager", HALF, 15),
        backend("hmmoe", "aoti", HALF, 90),
        backend("hmmoe", "compile", HALF, 75),
        backend("hmmoe", "aoti", "fp32", 90),
        Step("tiny_ganet_train_resume", functools.partial(train_resume, adapter="ganet"),
             min_s=20),
        Step("vitb16_ganet_train", functools.partial(big_train, adapter="ganet"), min_s=45),
        backend("ganet", "eager", "fp32", 15),
        backend("ganet", "eager", HALF, 15),
        Step("tiny_hmmoe_export_verify", export_verify, min_s=60),
        backend("hmmoe", "onnxruntime", "fp32", 60, missing=_ort_missing),
        backend("hmmoe", "tensorrt", HALF, 200, missing=_tensorrt_missing),
        backend("ganet", "aoti", HALF, 90),
        backend("ganet", "compile", HALF, 75, dry=once),
        backend("hmmoe", "compile", "fp32", 75, dry=once),
    ]


STEPS = _steps()
STEP_NAMES = [step.name for step in STEPS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Steps: " + ", ".join(STEP_NAMES))
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on CPU at tiny size (no GPU needed)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after start after which no step starts (420; dry "
                             "run 900)")
    parser.add_argument("--hard-limit", type=float, default=None,
                        help="seconds after start at which the running step is cut (470)")
    parser.add_argument("--only", default="", help="comma-separated steps to run (the "
                                                    "others are skipped; a step still needs "
                                                    "the steps it builds on)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder for runs and packages (default: a temporary "
                             "one, removed at the end)")
    args = parser.parse_args(argv)
    settings = settings_for(args.dry_run, args.deadline, args.hard_limit)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first touches CUDA
        # Tiny models gain nothing from a second thread, and on a busy machine threads
        # that wait for each other make every step many times slower.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    only = {s for s in args.only.split(",") if s}
    if unknown := sorted(only - set(STEP_NAMES)):
        parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEP_NAMES)}")
    _bootstrap()
    if args.dry_run:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if not args.dry_run and not _cuda():
        print("error: no CUDA device here (torch.cuda.is_available() is False); run with "
              "--dry-run to check the code on CPU", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="mmdeploy-gpu-check-"))
    os.environ.setdefault("MMDEPLOY_CACHE", str(work / "cache"))
    check = Check(args.out, work, settings, STEPS)
    check.log(f"gpu_check ({'dry run, CPU' if args.dry_run else 'CUDA'}): out {args.out}, "
              f"work {work}, deadline {settings.deadline_s:.0f} s, hard limit "
              f"{settings.hard_limit_s:.0f} s")
    watchdog = threading.Timer(max(settings.hard_limit_s - check.elapsed(), 0),
                               check.cut, args=(f"hard limit of {settings.hard_limit_s:.0f} s",))
    watchdog.daemon = True
    watchdog.start()
    signal.signal(signal.SIGTERM, lambda *_: check.cut("terminated (SIGTERM)"))
    check.only = only
    try:
        check.run(STEPS)
    finally:
        watchdog.cancel()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(check.steps, settings)
    check.log(f"done in {check.elapsed():.0f} s: {summary['statuses']}; parity all passed: "
              f"{summary['parity_all_passed']}")
    for target in summary["targets"]:
        check.log(f"target {target['target']} ({target['step']}, B={target['batch']}, "
                  f"{target['basis']}): {target['value']} (at least {target['at_least']}): "
                  f"{'met' if target['met'] else 'NOT met' if target['met'] is False else '-'}")
    failed = summary["errors"] or summary["parity_all_passed"] is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
