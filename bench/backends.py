"""`mmdeploy bench`: every available backend against PyTorch eager, in one process.

For each batch size and backend, the adapted model (the run's deploy form, or its verified
export) and the frozen backbone alone (the image tower and projection with the zero-shot
head, exported the same way into a temporary folder) are timed after a warm-up: median and
p90 latency, images/s, and the peak memory while that backend ran. Ratios are taken within
the one run: speed-up over eager (eager median / backend median, adapted and backbone each
against their own eager) and adapted / backbone on the same backend (the adapter's cost).

Timings go from host pixels (numpy, FP32) to host outputs for every backend, eager
included, so transfers are counted alike. Eager and `torch.compile` run the deploy form,
the same function every exporter compiles. Peak memory is the process's resident set
(Linux resets its high-water mark before each measurement; it includes every model
loaded) and, on CUDA, torch's peak allocation (which does not see onnxruntime's or
TensorRT's own allocators).

INT8: when the run's export has a CPU INT8 graph that passed its gate
(the manifest's "int8" export), `onnxruntime-int8` times it exactly like the FP32 `onnxruntime`
row (the same predictor class and session settings, the same `measure`), and the
accuracy gate's figures recorded at export (agreement, accuracy drop, cosine, nodes kept
FP32, method) are shown beside its speed. Its backbone-alone comparison is skipped: the
INT8 graph's quantization (method, calibration images, the nodes kept FP32) belongs to the
run's graph and cannot be reproduced on the bench-only backbone export, so an "adapter
overhead" would compare two differently quantized models. Its speed-up over the FP32
onnxruntime row is reported instead.

`--record` keeps each export backend's timing in the run's export records, where
`pick_backend` reads it; `export --format auto` records the same timings itself, and is
the usual way (see `mmdeploy.runtime.timing`).

How close to the hardware: in the same run the bench measures ONNX Runtime's FP32 MatMul
and INT8 MatMulInteger throughput on this machine (`peak`), counts the model's FLOPs
from its exported FP32 graph, and gives each row's achieved GFLOP/s (FLOPs per image x
images/s) and its share of the matching peak: FP32 rows against the FP32 peak, the INT8
row against the INT8 peak, on the peak's device only (FP16 rows have none).
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmdeploy.artifacts import Manifest, RunDir, atomic_write_json, installed_versions
from mmdeploy.backbone import load_backbone, torch_device
from mmdeploy.bench.peak import FlopCount, Peak, count_flops, measure_peak
from mmdeploy.errors import ConfigError, MmdeployError
from mmdeploy.questions import QuestionTokenizer
from mmdeploy.runs import RunConfig, load_model, load_run_config
from mmdeploy.runtime import BACKEND_TABLE
from mmdeploy.runtime.timing import (
    Outputs,
    Runner,
    Timing,
    cpu_name,
    measure,
    predictor_runner,
    recorded,
    with_questions,
)

# Eager is the reference and always runs; the others run where available.
INT8_BACKEND = "onnxruntime-int8"  # the run's CPU INT8 graph in ONNX Runtime
EXPORT_BACKENDS = ("onnxruntime", INT8_BACKEND, "aoti", "tensorrt")
BENCH_BACKENDS = ("eager", "compile", "eager-fp16", *EXPORT_BACKENDS)
_VERSIONED = ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "transformers")


@dataclass
class Row:
    backend: str
    device: str
    precision: str
    batch: int
    adapted: Timing
    backbone: Timing | None = None
    speedup_vs_eager: float | None = None
    backbone_speedup_vs_eager: float | None = None
    adapted_over_backbone: float | None = None
    achieved_gflops: float | None = None  # GOP/s for the INT8 row
    peak_share: float | None = None


@dataclass
class BenchResult:
    created: str
    host: str
    machine: dict
    versions: dict
    run: str
    adapter: str
    backbone: str
    image_size: list[int]
    settings: dict
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    backbone_export_max_abs: dict[str, float] = field(default_factory=dict)
    peak: Peak | None = None
    model_flops: FlopCount | None = None
    int8: dict | None = None  # the INT8 export's file, gate, details; speed-up over FP32 ORT

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- runners


def torch_runner(module: nn.Module, backend: str, device: str, precision: str,
                 compiled: bool = False) -> Runner:
    dtype = torch.float16 if precision == "fp16" else torch.float32
    module = module.to(device=device, dtype=dtype).eval()
    # Freezing folds the frozen weights into the graph as constants (inference only).
    call = torch.compile(module, options={"freezing": True}) if compiled else module

    @torch.inference_mode()
    def run(*inputs: np.ndarray) -> Outputs:  # pixels (and a vqa model's question tokens)
        logits, embeddings = call(*(
            torch.from_numpy(x).to(device=device, dtype=dtype)
            if np.issubdtype(x.dtype, np.floating) else torch.from_numpy(x).to(device)
            for x in inputs))
        return {"logits": logits.float().cpu().numpy(),
                "embeddings": embeddings.float().cpu().numpy()}

    return Runner(backend, device, precision, run)


def _eager_runners(deploy: nn.Module, wanted: set[str], skipped: dict) -> list[Runner]:
    device = torch_device()
    runners = [torch_runner(deploy, "eager", device, "fp32")]
    if "compile" in wanted:
        runners.append(torch_runner(deploy, "compile", device, "fp32", compiled=True))
    if "eager-fp16" in wanted:
        if device == "cuda":
            runners.append(torch_runner(copy.deepcopy(deploy), "eager-fp16", device, "fp16"))
        else:
            skipped["eager-fp16"] = "FP16 eager is measured on CUDA only"
    return runners


def _int8_runner(run_dir: RunDir) -> tuple[Runner, dict]:
    """The run's CPU INT8 graph through the predictor that serves it (the FP32 row's class
    and settings, with precision "int8": gate passed, sha256 checked), and its record."""
    from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor

    predictor = OnnxRuntimePredictor(run_dir.root, precision="int8")
    record = predictor.record
    info = {"file": record.main_file, "gate": record.check, **record.details}
    if predictor.task == "vqa":
        return with_questions(Runner(INT8_BACKEND, predictor.device, "int8",
                                     predictor.run_questions), predictor.question_tokenizer), info
    return Runner(INT8_BACKEND, predictor.device, "int8", predictor.run_pixels), info


def _backbone_runner(frozen: nn.Module, backend: str, precision: str,
                     batch_range: tuple[int, int, int], workdir: Path) -> Runner:
    """The frozen backbone exported to `backend` the way the run's model was (TensorRT
    builds from the same ONNX file onnxruntime runs)."""
    from mmdeploy.exporters.aoti import compile_aoti
    from mmdeploy.exporters.onnx import export_onnx
    from mmdeploy.runtime.onnxruntime import OnnxSession

    low, opt, high = batch_range
    image_size = frozen.backbone.preprocessor.image_size
    onnx_path = workdir / "model.onnx"
    if backend in ("onnxruntime", "tensorrt") and not onnx_path.exists():
        export_onnx(frozen, onnx_path, image_size, low, high, 18)
    if backend == "onnxruntime":
        session = OnnxSession(onnx_path)
        return Runner(backend, "cuda" if session.on_gpu else "cpu", precision, session)
    if backend == "aoti":
        from mmdeploy.runtime.aoti import AotiPackage

        device = torch_device()
        compile_aoti(frozen, workdir / "model.pt2", image_size, low, high, device, precision)
        return Runner(backend, device, precision,
                      AotiPackage(workdir / "model.pt2", device, precision))
    from mmdeploy.exporters.tensorrt import build_engine
    from mmdeploy.runtime.tensorrt import Profile, load_engine

    profile = Profile.for_batches(low, opt, high, image_size)
    engine, sidecar, _ = build_engine(onnx_path, workdir, profile, precision, log=lambda _: None)
    return Runner(backend, "cuda", precision, load_engine(workdir, engine, sidecar))


# ---------------------------------------------------------------------------- the bench


def bench_run(run_path: str | Path, batches: list[int], backends: list[str] | None = None,
              warmup: int = 5, iters: int = 30, backbone_label: str | None = None,
              log: Callable[[str], None] = print, peak_size: int = 2048) -> BenchResult:
    """Bench every requested backend (default: all available) of a run.

    `peak_size`: the square matmul the machine's peak is measured on (0 skips it).
    """
    unknown = sorted(set(backends or ()) - set(BENCH_BACKENDS))
    if unknown:
        raise ConfigError(f"unknown bench backend(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(BENCH_BACKENDS)}")
    if not batches or min(batches) < 1:
        raise ConfigError("--batch needs positive batch sizes, e.g. 1,8,32")
    wanted = set(backends or BENCH_BACKENDS) | {"eager"}
    run_dir = RunDir(Path(run_path))
    run = load_run_config(run_dir)
    log(f"loading {run.adapter} run {run_dir.root}")
    deploy = load_model(run_dir.root)[0].to_deploy()
    skipped: dict[str, str] = {}
    adapted = _eager_runners(deploy, wanted, skipped)
    if run.task == "vqa":  # timed on the typical questions; no image-only backbone beside it
        backbone = deploy.backbone
        tokenizer = QuestionTokenizer(backbone.tokenizer, backbone.max_text_length)
        adapted = [with_questions(r, tokenizer) for r in adapted]
        frozen = None
        baseline: list[Runner | None] = [None] * len(adapted)
    else:
        frozen = _frozen_backbone(run)
        baseline = list(_eager_runners(frozen, wanted, {}))
    int8_info = None
    for backend in (b for b in EXPORT_BACKENDS if b in wanted):
        try:
            if backend == INT8_BACKEND:
                runner, int8_info = _int8_runner(run_dir)
            else:
                runner = predictor_runner(run_dir.root, backend)
            adapted.append(runner)
        except MmdeployError as exc:
            skipped[backend] = str(exc)
    result = _new_result(run_dir, run, deploy, batches, warmup, iters, backbone_label, skipped)
    result.model_flops = _model_flops(run_dir)
    if peak_size:
        log(f"measuring this machine's ONNX Runtime matmul peak ({peak_size}-square)")
        result.peak = measure_peak(peak_size)
    height, width = deploy.backbone.preprocessor.image_size
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="mmdeploy-bench-") as tmp:
        batch_range = (min(batches), min(batches), max(batches))
        for runner in adapted[len(baseline):]:
            if runner.backend == INT8_BACKEND or frozen is None:  # no backbone-alone export
                baseline.append(None)
                continue
            log(f"exporting the backbone alone to {runner.backend} for comparison")
            baseline.append(_backbone_runner(frozen, runner.backend, runner.precision,
                                             batch_range, Path(tmp)))
        _check_backbone_exports(baseline, result, (height, width))
        for batch in batches:
            pixels = rng.standard_normal((batch, 3, height, width), dtype=np.float32)
            eager = None
            for runner, reference in zip(adapted, baseline, strict=True):
                log(f"batch {batch}: {runner.backend}")
                row = Row(runner.backend, runner.device, runner.precision, batch,
                          measure(runner, pixels, warmup, iters),
                          measure(reference, pixels, warmup, iters) if reference else None)
                eager = eager or row
                row.speedup_vs_eager = _ratio(eager.adapted.median_ms, row.adapted.median_ms)
                if row.backbone is not None:
                    row.backbone_speedup_vs_eager = _ratio(eager.backbone.median_ms,
                                                           row.backbone.median_ms)
                    row.adapted_over_backbone = _ratio(row.adapted.median_ms,
                                                       row.backbone.median_ms)
                _add_achieved(row, result.model_flops, result.peak)
                result.rows.append(row)
    if int8_info is not None:
        result.int8 = {**int8_info, "speedup_vs_onnxruntime_fp32": _int8_speedups(result.rows)}
    return result


def _model_flops(run_dir: RunDir) -> FlopCount | None:
    """The MatMul/Gemm/Conv FLOPs per image of the run's exported FP32 graph, if it has one."""
    from mmdeploy.runtime.onnxruntime import ONNX_FILE

    path = run_dir.export_dir / ONNX_FILE
    return count_flops(path) if path.is_file() else None


def _add_achieved(row: Row, flops: FlopCount | None, peak: Peak | None) -> None:
    """Achieved GFLOP/s (GOP/s for INT8) and its share of the matching peak, when both the
    FLOPs and a peak for the row's precision on its device are known."""
    if flops is None:
        return
    row.achieved_gflops = round(flops.total * row.adapted.images_per_s / 1e9, 2)
    best = peak.for_precision(row.precision) if peak and peak.device == row.device else None
    if best:
        row.peak_share = round(row.achieved_gflops / best, 4)


def _int8_speedups(rows: list[Row]) -> dict[str, float]:
    """{batch: FP32 onnxruntime median / INT8 median} for each batch that has both rows."""
    fp32 = {r.batch: r for r in rows if r.backend == "onnxruntime"}
    return {str(r.batch): _ratio(fp32[r.batch].adapted.median_ms, r.adapted.median_ms)
            for r in rows if r.backend == INT8_BACKEND and r.batch in fp32}


def _frozen_backbone(run: RunConfig) -> nn.Module:
    """The backbone alone with the zero-shot head, in its deploy form (no text tower)."""
    from mmdeploy.models.baselines.model import ZeroShotModel

    backbone = load_backbone(run.backbone, expected_identity=run.backbone_identity)
    model = ZeroShotModel(backbone, ZeroShotModel.config_class(), run.class_names,
                          run.data.prompt_template)
    return model.to_deploy()


def _check_backbone_exports(runners: list[Runner | None], result: BenchResult,
                            image_size: tuple[int, int]) -> None:
    """Max abs logit difference of each backbone runner (compiled, or exported for the bench
    only) from the backbone's eager run: recorded, not a gate."""
    if runners[0] is None:  # a vqa run: no backbone-alone runners
        return
    pixels = np.random.default_rng(1).standard_normal((2, 3, *image_size), dtype=np.float32)
    expected = runners[0].run(pixels)["logits"]
    for runner in (r for r in runners[1:] if r is not None):
        got = runner.run(pixels)["logits"]
        result.backbone_export_max_abs[runner.backend] = float(np.abs(got - expected).max())


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 4)


def _new_result(run_dir: RunDir, run: RunConfig, deploy: nn.Module, batches: list[int],
                warmup: int, iters: int, label: str | None, skipped: dict) -> BenchResult:
    return BenchResult(
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host=platform.node(),
        machine=_machine(),
        versions=installed_versions(_VERSIONED),
        run=str(run_dir.root),
        adapter=run.adapter,
        backbone=label or run.backbone.spec,
        image_size=list(deploy.backbone.preprocessor.image_size),
        settings={"batches": batches, "warmup": warmup, "iters": iters},
        skipped=skipped,
    )


def _machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu}




def default_results_path(label: str) -> Path:
    """benchmarks/results/<date>-<host>-<backbone>.json under the current directory."""
    name = f"{datetime.date.today()}-{platform.node()}-{label}.json"
    return Path("benchmarks") / "results" / name


def write_result(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result.to_dict())


RECORDED_BACKENDS = ("onnxruntime", "aoti", "tensorrt")
"""The bench's rows that `--record` keeps: the backends `pick_backend` chooses among."""


def record_timings(run_path: str | Path, result: BenchResult) -> list[str]:
    """`bench --record`: keep the bench's timing of each backend above in the record of the
    FP32 export it ran (for `pick_backend`), the row at that export's OPT batch or else at
    the nearest batch benched; one line for each timing kept."""
    run_dir = RunDir(Path(run_path))
    if not run_dir.manifest_path.exists():
        return []
    manifest = Manifest.load(run_dir.manifest_path)
    lines = []
    for backend in RECORDED_BACKENDS:
        record = manifest.record(BACKEND_TABLE[backend].record_for("fp32"))
        rows = [row for row in result.rows if row.backend == backend]
        if record is None or not rows:
            continue
        opt = record.batch_range.get("opt", record.batch_range["min"])
        row = min(rows, key=lambda r: abs(r.batch - opt))
        record.add_timing(recorded(row.device, row.batch, row.adapted.median_ms, "bench"))
        lines.append(f"recorded {backend} on {row.device}: {row.adapted.median_ms:.2f} ms at "
                     f"batch {row.batch}")
    manifest.save(run_dir.manifest_path)
    return lines


def render_table(result: BenchResult):
    """A rich Table: one line per backend and batch, with the peak, the model's FLOPs and
    the INT8 gate's figures in its caption."""
    from rich.table import Table

    table = Table(title=f"{result.adapter} on {result.backbone} "
                        f"({result.machine['cpu']}, {result.machine['torch_threads']} threads)",
                  caption="\n".join(summary_lines(result)), caption_justify="left")
    for column in ("backend", "batch", "median ms", "p90 ms", "img/s", "peak RSS MB",
                   "x eager", "backbone ms", "backbone x eager", "adapter overhead", "GFLOP/s",
                   "% peak"):
        table.add_column(column, justify="left" if column == "backend" else "right",
                         no_wrap=column == "backend")
    for row in result.rows:
        table.add_row(
            f"{row.backend} {row.device} {row.precision}", str(row.batch),
            f"{row.adapted.median_ms:.3f}", f"{row.adapted.p90_ms:.3f}",
            f"{row.adapted.images_per_s:,.0f}",
            _or_dash(row.adapted.peak_rss_mb, "{:,.0f}"), f"{row.speedup_vs_eager:.2f}x",
            _or_dash(row.backbone and row.backbone.median_ms, "{:.3f}"),
            _or_dash(row.backbone_speedup_vs_eager, "{:.2f}x"),
            _or_dash(row.adapted_over_backbone and (row.adapted_over_backbone - 1) * 100,
                     "{:+.1f}%"),
            _or_dash(row.achieved_gflops, "{:,.1f}"), _or_dash(row.peak_share, "{:.1%}"))
    return table


def summary_lines(result: BenchResult) -> list[str]:
    """The lines under the table: the machine's peak, the model's FLOPs, the INT8 gate."""
    lines = []
    if (peak := result.peak) is not None:
        int8 = "not measured on this provider" if peak.int8_gops is None else (
            f"{peak.int8_gops:,.0f} GOP/s ({peak.int8_gops / peak.fp32_gflops:.1f}x)")
        lines.append(f"peak: ONNX Runtime {peak.provider}, {peak.size}-square, median of "
                     f"{peak.iters}: FP32 MatMul {peak.fp32_gflops:,.0f} GFLOP/s, "
                     f"INT8 MatMulInteger {int8}")
    if (flops := result.model_flops) is not None:
        unresolved = len(flops.unresolved)
        bound = f" (a lower bound: {unresolved} nodes unresolved)" if unresolved else ""
        lines.append(f"model: {flops.total / 1e9:.3g} GFLOP per image{bound}, MatMul/Gemm/Conv "
                     "of model.onnx at batch 1 (softmax, normalisation, elementwise not "
                     "counted); INT8 rows in GOP/s against the INT8 peak")
    if (int8 := result.int8) is not None:
        lines.append(_int8_line(int8))
    return lines


def _int8_line(int8: dict) -> str:
    gate = int8.get("gate") or {}
    verdict = {True: "passed", False: "FAILED"}.get(gate.get("passed"), "not recorded")
    if bounds := gate.get("bounds"):
        verdict += (f" (bounds: agreement >= {bounds['min_agreement']:.1%}, drop <= "
                    f"{bounds['max_drop_points']:g} points)")
    figures = [f"top-1 agreement {_or_dash(gate.get('agreement'), '{:.1%}')}",
               f"accuracy drop {_or_dash(gate.get('accuracy_drop_points'), '{:.2f}')} points",
               f"cosine min {_or_dash(gate.get('cosine_min'), '{:.4f}')}",
               f"kept FP32: {len(int8.get('kept_fp32') or [])} by the gate's fallback + "
               f"{len(int8.get('excluded_from_start') or [])} from the start"]
    speedups = ", ".join(f"{x:.2f}x at batch {batch}"
                         for batch, x in int8.get("speedup_vs_onnxruntime_fp32", {}).items())
    return (f"{INT8_BACKEND}: {int8.get('method', '?')} INT8 ({int8['file']}), gate "
            f"{verdict}: {', '.join(figures)}; vs onnxruntime fp32: {speedups or '-'}")


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)
