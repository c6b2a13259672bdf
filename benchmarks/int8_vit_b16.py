"""INT8 on ONNX Runtime at the ViT-B/16-sized backbone (issue 9), in one process.

    HF_HUB_OFFLINE=1 python benchmarks/int8_vit_b16.py runs/bench-vitb16 --batch 1,8,32

RUN is an exported run (its verified `export/model.onnx` is read, never changed); when it
does not exist, it is built first as `mmdeploy bench RUN --backbone vit-b16` builds it
(`mmdeploy.bench.vit_b16.prepare_run`: a one-step run on a random ViT-B/16-sized CLIP).

1. Four INT8 graphs are quantized from that FP32 graph into a temporary folder, with the
   project's own code (`exporters/int8.py`, `calibration.py`, `gate.py`, combined as
   `exporters/export.py` does for `mmdeploy export --int8`), and held to the accuracy gate
   with its default bounds (top-1 agreement >= 99%, accuracy drop <= 1 point):
   - `dynamic-naive`, `static-naive`: only the always-FP32 nodes excluded, no fallback;
   - `dynamic-gated`, `static-gated`: what `mmdeploy export --int8 dynamic|static` would
     publish (`quantize_gated`: the most sensitive MatMul groups back in FP32 until the
     gate passes), with the MatMuls it kept FP32 and each fallback step.
   A naive variant is the first candidate `quantize_gated` builds and gates
   (`Quantizer.build([])`): the gate callback keeps a hard link to that file before the
   fallback deletes it, so each method is quantized (and, for static, calibrated) once.
   When the gate passes at once, the gated variant is that same file: it is timed once.
   Static calibration takes `--calib` training images (one batch at a time, minmax by
   default); the dynamic fallback ranks its groups on as many training images.
2. After that, eager PyTorch (the run's deploy form, on the CPU), ONNX Runtime FP32 and each
   INT8 graph are timed at each batch size on random pixels
   (`mmdeploy.bench.backends.measure`: `--warmup`
   calls, then the median of `--iters`), batch by batch with every backend loaded, so the
   ratios (x eager; INT8 speed-up = FP32 ORT median / INT8 median) come from one run. Each
   row's achieved GFLOP/s (GOP/s for INT8: the FP32 graph's MatMul/Gemm/Conv work, as
   `mmdeploy bench` counts it) is given as a share of this machine's ONNX Runtime FP32
   MatMul / INT8 MatMulInteger peak, measured in the same run (`mmdeploy.bench.peak`; static QDQ
   graphs run ORT's fused U8S8 kernels rather than MatMulInteger: the same peak, roughly).
3. File sizes (MB) of the FP32 graph and of each INT8 graph, and the wall time of every
   phase.

On the ViT-B/16-sized bench backbone the weights are random: accuracy means nothing there,
but agreement with the FP32 model (and the logit cosine) still measure quantization error.
Writes benchmarks/results/<date>-<host>-int8-<backbone>.json (or --out) and prints tables.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mmdeploy.artifacts import RunDir, installed_versions
from mmdeploy.bench.backends import (
    _VERSIONED,
    Runner,
    Timing,
    _machine,
    default_results_path,
    measure,
    torch_runner,
    write_result,
)
from mmdeploy.bench.peak import FlopCount, Peak, count_flops, measure_peak
from mmdeploy.exporters import int8
from mmdeploy.exporters.calibration import PixelReader, calibration_reader
from mmdeploy.exporters.gate import GateBounds, GateData, candidate_logits, gate_data
from mmdeploy.exporters.gate import measure as gate_measure
from mmdeploy.registry import ADAPTERS
from mmdeploy.runs import RunConfig, load_model, load_run_config
from mmdeploy.runtime.onnxruntime import ONNX_FILE, OnnxSession
from mmdeploy.runtime.records import verified_record

REPO = Path(__file__).resolve().parent.parent
RANDOM_NOTE = ("backbone weights are random (ViT-B/16-sized bench backbone): accuracy means "
               "nothing; agreement with the FP32 model and logit cosine still measure "
               "quantization error")


@dataclass
class Variant:
    """One INT8 graph: how it was made, its gate figures and its size."""

    name: str  # dynamic-naive, static-naive, dynamic-gated, static-gated
    method: str
    fallback: bool
    gate: dict
    quantized_matmuls: int  # MatMul/Gemm nodes in INT8
    kept_fp32_by_fallback: int
    excluded_from_start: int  # normalisation, softmax, router, head...: always FP32
    int8_share: float  # of the quantizable MatMul work
    quantize_seconds: float  # in ORT's quantizer (calibration included)
    wall_seconds: float  # quantizing, gating and (gated) ranking
    size_mb: float
    calibration: dict | None = None
    builds: int = 1
    fallback_steps: list[dict] = field(default_factory=list)
    fallback_stopped: str | None = None
    kept_fp32_nodes: list[str] = field(default_factory=list)
    same_file_as: str | None = None  # a gated variant that is its naive one (gate passed)
    path: Path | None = field(default=None, repr=False)  # not written to the results


@dataclass
class Row:
    backend: str  # eager, onnxruntime, or an INT8 variant's name(s)
    device: str
    precision: str
    batch: int
    timing: Timing
    speedup_vs_eager: float | None = None
    speedup_vs_onnxruntime_fp32: float | None = None  # INT8 rows only
    achieved_gflops: float | None = None  # GOP/s for INT8 rows
    peak_share: float | None = None


@dataclass
class Int8BenchResult:
    created: str
    host: str
    machine: dict
    versions: dict
    run: str
    adapter: str
    backbone: str
    image_size: list[int]
    settings: dict
    note: str | None
    gate_images: dict
    fp32_size_mb: float
    variants: list[Variant] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    peak: Peak | None = None
    model_flops: FlopCount | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        for variant in data["variants"]:
            variant.pop("path")
        return data


class Phases:
    """Wall seconds of each phase, logged as they end."""

    def __init__(self, log: Callable[[str], None]):
        self.seconds: dict[str, float] = {}
        self.log = log

    def run(self, name: str, work: Callable[[], object]):
        started = time.perf_counter()
        value = work()
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.log(f"[phase] {name}: {self.seconds[name]:.1f} s")
        return value


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# ---------------------------------------------------------------------------- the run


def backbone_label(run: RunConfig) -> str:
    from mmdeploy.bench.vit_b16 import LABEL

    name = Path(run.backbone.spec).name
    return LABEL if name.startswith("vit-b16-clip-random") else name


def ensure_run(path: Path, adapter: str, batches: list[int]) -> None:
    """Build RUN as `mmdeploy bench --backbone vit-b16` does, only when it does not exist
    (an existing run is only read)."""
    if path.exists():
        return
    from mmdeploy.bench.vit_b16 import prepare_run

    prepare_run(path, adapter, batches, log=log)


def verified_onnx(run_dir: RunDir) -> list[Path]:
    """The run's parity-verified FP32 graph, then any external data file (sha256 checked)."""
    record = verified_record(run_dir, "onnx")
    return [run_dir.export_dir / n for n in record.files]  # the graph first


# ---------------------------------------------------------------------------- variants


def gated_pair(quantizer: int8.Quantizer, data: GateData, bounds: GateBounds,
               probe: Callable[[], np.ndarray], naive_path: Path) -> list[Variant]:
    """Run `quantize_gated` once and return its first candidate (the naive variant) and its
    result (the gated one). The first gated file is `Quantizer.build([])`: only the
    always-FP32 exclusions; it is hard-linked before a fallback would delete it."""
    first: dict = {}
    started = time.perf_counter()

    def gate(path: Path):
        report = gate_measure(data, candidate_logits(OnnxSession(path), data.pixels), bounds)
        if not first:
            if quantizer.builds != 1:  # quantize_gated no longer gates build([]) first
                raise RuntimeError("the first gated candidate is not the naive build")
            os.link(path, naive_path)
            first.update(report=report, seconds=quantizer.seconds,
                         wall=time.perf_counter() - started)
        return report

    result = int8.quantize_gated(quantizer, gate, probe, log)
    wall = time.perf_counter() - started
    method = quantizer.method
    common = dict(method=method, excluded_from_start=len(quantizer.excluded_from_start),
                  calibration=quantizer.calibration_record)
    naive = Variant(f"{method}-naive", fallback=False, gate=first["report"].to_dict(),
                    quantized_matmuls=len(quantizer.work), kept_fp32_by_fallback=0,
                    int8_share=1.0, quantize_seconds=round(first["seconds"], 2),
                    wall_seconds=round(first["wall"], 2),
                    size_mb=naive_path.stat().st_size / 1e6, path=naive_path, **common)
    gated = Variant(f"{method}-gated", fallback=True, gate=result.report.to_dict(),
                    quantized_matmuls=len(quantizer.work) - len(result.kept_fp32),
                    kept_fp32_by_fallback=len(result.kept_fp32),
                    int8_share=round(result.int8_share, 4),
                    quantize_seconds=round(result.quantize_seconds, 2),
                    wall_seconds=round(wall, 2), size_mb=result.path.stat().st_size / 1e6,
                    builds=quantizer.builds, fallback_steps=result.fallback_steps,
                    fallback_stopped=result.stopped, kept_fp32_nodes=result.kept_fp32,
                    path=result.path, **common)
    if not result.fallback_steps:  # passed at once: the very same graph
        gated.same_file_as, gated.path = naive.name, None
    return [naive, gated]


def build_variants(source: Path, data: GateData, reader: PixelReader, args, workdir: Path,
                   phases: Phases) -> list[Variant]:
    """dynamic-naive, dynamic-gated, static-naive, static-gated, in `workdir`."""
    bounds = GateBounds()

    def probe():  # as export with --calib N: the calibration images, for both methods
        return reader.pixels

    variants = []
    for method in ("dynamic", "static"):
        folder = workdir / method
        folder.mkdir()
        quantizer = int8.Quantizer(source, method, folder,
                                   reader if method == "static" else None, args.calib_method)
        variants += phases.run(f"quantize {method} (naive + gated)", lambda q=quantizer: (
            gated_pair(q, data, bounds, probe, workdir / f"{q.method}-naive.onnx")))
    return variants


# ---------------------------------------------------------------------------- timing


def runners(deploy: torch.nn.Module, source: Path, variants: list[Variant]) -> list[Runner]:
    """Eager, FP32 ORT, then each distinct INT8 file (a gated one that is its naive one is
    timed once, under both names)."""
    fp32 = OnnxSession(source)
    found = [torch_runner(deploy, "eager", "cpu", "fp32"),
             Runner("onnxruntime", "cuda" if fp32.on_gpu else "cpu", "fp32", fp32)]
    for variant in (v for v in variants if v.path is not None):
        twins = [v.name for v in variants if v.same_file_as == variant.name]
        session = OnnxSession(variant.path)
        found.append(Runner(" = ".join([variant.name, *twins]),
                            "cuda" if session.on_gpu else "cpu", "int8", session))
    return found


def time_all(found: list[Runner], batches: list[int], image_size: tuple[int, int], args,
             flops: FlopCount, peak: Peak | None) -> list[Row]:
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        pixels = rng.standard_normal((batch, 3, *image_size), dtype=np.float32)
        for runner in found:
            log(f"batch {batch}: {runner.backend}")
            rows.append(Row(runner.backend, runner.device, runner.precision, batch,
                            measure(runner, pixels, args.warmup, args.iters)))
        add_ratios(rows[-len(found):], flops, peak)
    return rows


def add_ratios(rows: list[Row], flops: FlopCount, peak: Peak | None) -> None:
    """x eager for every row, x FP32 ORT for INT8 rows, achieved share of the matching peak
    (as `mmdeploy bench` computes it)."""
    eager, fp32 = rows[0].timing.median_ms, rows[1].timing.median_ms
    for row in rows:
        row.speedup_vs_eager = round(eager / row.timing.median_ms, 4)
        if row.precision == "int8":
            row.speedup_vs_onnxruntime_fp32 = round(fp32 / row.timing.median_ms, 4)
        row.achieved_gflops = round(flops.total * row.timing.images_per_s / 1e9, 2)
        best = peak.for_precision(row.precision) if peak and peak.device == row.device else None
        if best:
            row.peak_share = round(row.achieved_gflops / best, 4)


# ---------------------------------------------------------------------------- output


def render(result: Int8BenchResult) -> list[Table]:
    return [timing_table(result), variant_table(result)]


def timing_table(result: Int8BenchResult) -> Table:
    table = Table(title=f"INT8 vs FP32: {result.adapter} on {result.backbone} "
                        f"({result.machine['cpu']}, {result.machine['torch_threads']} threads)",
                  caption="\n".join(caption_lines(result)), caption_justify="left")
    for column in ("backend", "batch", "median ms", "p90 ms", "img/s", "peak RSS MB",
                   "x eager", "x FP32 ORT", "GFLOP/s", "% peak"):
        table.add_column(column, justify="left" if column == "backend" else "right",
                         no_wrap=column == "backend")
    for row in result.rows:
        table.add_row(f"{row.backend} {row.precision}", str(row.batch),
                      f"{row.timing.median_ms:.2f}", f"{row.timing.p90_ms:.2f}",
                      f"{row.timing.images_per_s:,.1f}", dash(row.timing.peak_rss_mb, "{:,.0f}"),
                      f"{row.speedup_vs_eager:.2f}x",
                      dash(row.speedup_vs_onnxruntime_fp32, "{:.2f}x"),
                      dash(row.achieved_gflops, "{:,.1f}"), dash(row.peak_share, "{:.1%}"))
    return table


def variant_table(result: Int8BenchResult) -> Table:
    bounds = result.settings["gate_bounds"]
    table = Table(title=f"INT8 variants (FP32 {ONNX_FILE}: {result.fp32_size_mb:,.1f} MB; gate "
                        f"bounds: agreement >= {bounds['min_agreement']:.0%}, drop <= "
                        f"{bounds['max_drop_points']:g} point(s))",
                  caption="\n".join(fallback_lines(result)), caption_justify="left")
    for column in ("variant", "gate", "agreement", "drop pts", "cosine min/mean",
                   "MatMuls INT8", "fallback FP32", "always FP32", "INT8 work", "quantize s",
                   "wall s", "MB"):
        table.add_column(column, justify="left" if column == "variant" else "right",
                         no_wrap=column == "variant")
    for v in result.variants:
        gate = v.gate
        table.add_row(
            v.name + (f" (= {v.same_file_as})" if v.same_file_as else ""),
            "passed" if gate["passed"] else "FAILED", f"{gate['agreement']:.1%}",
            dash(gate["accuracy_drop_points"], "{:+.2f}"),
            f"{gate['cosine_min']:.4f} / {gate['cosine_mean']:.4f}", str(v.quantized_matmuls),
            str(v.kept_fp32_by_fallback), str(v.excluded_from_start), f"{v.int8_share:.1%}",
            f"{v.quantize_seconds:.1f}", f"{v.wall_seconds:.1f}", f"{v.size_mb:,.1f}")
    return table


def caption_lines(result: Int8BenchResult) -> list[str]:
    lines = []
    if (peak := result.peak) is not None:
        int8_peak = "-" if peak.int8_gops is None else f"{peak.int8_gops:,.0f} GOP/s"
        lines.append(f"peak: ONNX Runtime {peak.provider}, {peak.size}-square: FP32 MatMul "
                     f"{peak.fp32_gflops:,.0f} GFLOP/s, INT8 MatMulInteger {int8_peak}")
    if (flops := result.model_flops) is not None:
        lines.append(f"model: {flops.total / 1e9:.3g} GFLOP per image (MatMul/Gemm/Conv of the "
                     "FP32 graph; INT8 rows in GOP/s of the same count, against the INT8 peak)")
    gate = result.gate_images
    lines.append(f"gate: {gate['images']} images ({gate['labelled']} labelled, "
                 f"{gate['split']}); calibration: {result.settings['calib']} training images "
                 f"asked, {result.settings['calib_method']}")
    if result.note:
        lines.append(f"note: {result.note}")
    lines.append("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                        result.phase_seconds.items()))
    return lines


def fallback_lines(result: Int8BenchResult) -> list[str]:
    lines = []
    for v in (v for v in result.variants if v.fallback):
        steps = "; ".join(f"+{len(s['kept_fp32'])} ({s['fp32_share']:.0%} FP32): "
                          f"{s['gate']['agreement']:.1%}" for s in v.fallback_steps)
        stopped = f", stopped: {v.fallback_stopped}" if v.fallback_stopped else ""
        lines.append(f"{v.name}: {v.builds} builds, steps: {steps or 'none'}{stopped}")
    return lines


def dash(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an exported run (built when it does not exist)")
    parser.add_argument("--adapter", default="hmmoe", choices=sorted(ADAPTERS),
                        help="adapter of RUN when it has to be built")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--calib", type=int, default=16,
                        help="training images for static calibration and the dynamic "
                             "fallback's ranking (fewer if the split is smaller)")
    parser.add_argument("--calib-method", default="minmax",
                        choices=sorted(int8.CALIBRATION_METHODS))
    parser.add_argument("--calib-seed", type=int, default=0)
    parser.add_argument("--peak-size", type=int, default=2048,
                        help="square matmul of the ORT FP32/INT8 peak (0 skips it)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: benchmarks/results/"
                             "<date>-<host>-int8-<backbone>.json)")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",")]
    if min(args.batches) < 1 or args.iters < 1 or args.warmup < 0 or args.calib < 1:
        parser.error("batch sizes, --iters and --calib must be >= 1, --warmup >= 0")
    return args


def new_result(run_dir: RunDir, run: RunConfig, image_size, args, data: GateData,
               fp32_mb: float) -> Int8BenchResult:
    label = backbone_label(run)
    return Int8BenchResult(
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host=platform.node(), machine=_machine(),
        versions=installed_versions((*_VERSIONED, "onnx")), run=str(run_dir.root),
        adapter=run.adapter, backbone=label, image_size=list(image_size),
        settings={"batches": args.batches, "warmup": args.warmup, "iters": args.iters,
                  "calib": args.calib, "calib_method": args.calib_method,
                  "calib_seed": args.calib_seed, "peak_size": args.peak_size,
                  "gate_bounds": asdict(GateBounds()), "max_groups": int8.MAX_GROUPS,
                  "max_fp32_share": int8.MAX_FP32_SHARE},
        note=RANDOM_NOTE if label == "vit-b16" else None,
        gate_images={"images": len(data), "labelled": int((data.labels >= 0).sum()),
                     "split": data.split},
        fp32_size_mb=round(fp32_mb, 2))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    phases = Phases(log)
    phases.run("prepare run", lambda: ensure_run(args.run, args.adapter, args.batches))
    run_dir = RunDir(args.run)
    run = load_run_config(run_dir)
    files = phases.run("verify model.onnx", lambda: verified_onnx(run_dir))
    source, fp32_mb = files[0], sum(f.stat().st_size for f in files) / 1e6
    model = phases.run("load model", lambda: load_model(run_dir.root)[0])
    preprocessor = model.backbone.preprocessor
    data = phases.run("gate data (FP32 PyTorch logits)",
                      lambda: gate_data(run, model, preprocessor))
    reader = phases.run("calibration images", lambda: calibration_reader(
        run, preprocessor, args.calib, args.calib_seed))
    log(f"gate: {len(data)} images; calibration: {len(reader.pixels)} training images")
    result = new_result(run_dir, run, preprocessor.image_size, args, data, fp32_mb)
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        result.variants = build_variants(source, data, reader, args, Path(tmp), phases)
        del reader
        result.model_flops = phases.run("count FLOPs", lambda: count_flops(source))
        if args.peak_size:
            result.peak = phases.run("ORT matmul peak", lambda: measure_peak(args.peak_size))
        found = phases.run("load runners", lambda: runners(model.to_deploy(), source,
                                                           result.variants))
        result.rows = phases.run("timing", lambda loaded=found: time_all(
            loaded, args.batches, preprocessor.image_size, args, result.model_flops,
            result.peak))
        del found  # close the sessions before their files go
    result.phase_seconds = phases.seconds
    console = Console(width=None if sys.stdout.isatty() else 180)
    for table in render(result):
        console.print(table)
    path = args.out or REPO / default_results_path(f"int8-{result.backbone}")
    write_result(result, path)
    log(f"-> {path}")


if __name__ == "__main__":
    main()
