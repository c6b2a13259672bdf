"""INT8 methods on the real pair (DINOv2-S/14 + MiniLM, issue 17), in one process.

    HF_HUB_OFFLINE=1 python benchmarks/int8_real.py RUN --out results.json

RUN is an exported run (`mmdeploy train ... && mmdeploy export --run RUN --format onnx`);
its verified `export/model.onnx` is read, never changed. For each method (`METHODS`, or
`--methods a,b`), an INT8 graph is quantized with the project's own code
(`exporters/int8.py`, as `mmdeploy export --int8 ...` does) into a temporary folder and
measured with the accuracy gate's own figures (`exporters/gate.py`: the FP32 PyTorch
model's labels on the run's validation split plus parity's held-out images):
- without the fallback (only the always-FP32 nodes excluded): top-1 agreement, accuracy
  drop, logit cosine, whether its graph is TensorRT-ready (`qdq.check_symmetric`);
- for the methods in `--fallback` and the `--fallback-best` failing ones with the highest
  agreement, once more with the gate's fallback (`quantize_gated`), with the share of the
  MatMul work it left FP32.
Calibration and smoothing use `--calib` training images drawn with `--calib-seed`.

Then ONNX Runtime FP32 and every INT8 graph are timed at each `--batch` on random pixels,
round-robin (`--warmup` rounds, then the median of `--iters` rounds, each calling every
session once: load changes on shared cores fall on all sessions alike), under the timing
lock (/tmp/mmdeploy-timing.lock, taken here).
The share of MatMul work left FP32 is given two ways: of the quantizable MatMuls (what the
fallback moved back), and of all MatMul/Gemm work of the graph (with the nodes kept FP32
from the start: normalisation-adjacent router scores, the cosine head, attention's
activation-by-activation products).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mmdeploy.artifacts import RunDir, installed_versions
from mmdeploy.bench.backends import _VERSIONED, _machine
from mmdeploy.bench.peak import count_flops
from mmdeploy.exporters import int8
from mmdeploy.exporters.calibration import calibration_reader
from mmdeploy.exporters.gate import GateBounds, candidate_logits, gate_data
from mmdeploy.exporters.gate import measure as gate_measure
from mmdeploy.runs import load_model, load_run_config
from mmdeploy.runtime.onnxruntime import OnnxSession
from mmdeploy.runtime.records import verified_record

TIMING_LOCK = "/tmp/mmdeploy-timing.lock"
# name -> (method, options, calibration method): today's methods first, then the new ones.
METHODS: dict[str, tuple[str, int8.Int8Options, str]] = {
    "dynamic": ("dynamic", int8.Int8Options(), "minmax"),
    "static-minmax": ("static", int8.Int8Options(), "minmax"),
    "static-entropy": ("static", int8.Int8Options(), "entropy"),
    "static-percentile": ("static", int8.Int8Options(), "percentile"),
    "dynamic-per-channel": ("dynamic", int8.Int8Options(per_channel=True), "minmax"),
    "dynamic-smooth0.5": ("dynamic", int8.Int8Options(smooth_alpha=0.5), "minmax"),
    "dynamic-per-channel-smooth0.5": ("dynamic", int8.Int8Options(per_channel=True,
                                                                  smooth_alpha=0.5), "minmax"),
    "dynamic-per-channel-smooth0.75": ("dynamic", int8.Int8Options(per_channel=True,
                                                                   smooth_alpha=0.75),
                                       "minmax"),
    "static-smooth0.5": ("static", int8.Int8Options(smooth_alpha=0.5), "minmax"),
    "static-symmetric": ("static", int8.Int8Options(symmetric=True), "minmax"),
    "static-symmetric-smooth0.5": ("static", int8.Int8Options(symmetric=True,
                                                              smooth_alpha=0.5), "minmax"),
}


@dataclass
class Variant:
    name: str
    method: str
    options: dict
    calibrate_method: str | None
    fallback: bool
    gate: dict
    quantized_matmuls: int
    kept_fp32_by_fallback: int
    fp32_share_of_quantizable_work: float
    fp32_share_of_all_matmul_work: float
    tensorrt_ready: bool
    tensorrt_refusal: str | None
    smoothing: dict | None
    quantize_seconds: float
    wall_seconds: float
    size_mb: float
    fallback_steps: list[dict] = field(default_factory=list)
    fallback_stopped: str | None = None
    timings: dict[str, dict] = field(default_factory=dict)  # batch -> timing + x FP32


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def build_variant(name: str, source: Path, workdir: Path, data, reader, run_dir: RunDir,
                  fallback: bool, all_work: float, probe) -> tuple[Variant, Path]:
    method, options, calibrate = METHODS[name]
    folder = workdir / (name + ("-fallback" if fallback else ""))
    folder.mkdir()
    started = time.perf_counter()
    needs_images = method == "static" or options.smooth_alpha is not None
    quantizer = int8.Quantizer(source, method, folder, reader if needs_images else None,
                               calibrate, options, run_dir.weights_path)
    bounds = GateBounds()

    def gate(path: Path):
        return gate_measure(data, candidate_logits(OnnxSession(path), data.pixels), bounds)

    if fallback:
        result = int8.quantize_gated(quantizer, gate, probe, log)
    else:  # the naive graph: the gate's figures, no fallback
        path = quantizer.build([])
        report = gate(path)
        result = int8.Int8Result(
            path=path, method=method, calibration=quantizer.calibration_record,
            excluded_from_start=quantizer.excluded_from_start, kept_fp32=[], report=report,
            fallback_steps=[], int8_share=1.0, quantize_seconds=quantizer.seconds,
            per_channel=quantizer.per_channel, options=asdict(options),
            smoothing=quantizer.smoothing.record() if quantizer.smoothing else None,
            tensorrt_problems=int8.tensorrt_problems(path))
    work = quantizer.work
    kept_work = sum(work[n] for n in result.kept_fp32)
    quantized_work = sum(work.values()) - kept_work
    details = result.details()
    variant = Variant(
        name=name, method=method, options=asdict(options),
        calibrate_method=calibrate if method == "static" else None, fallback=fallback,
        gate=result.report.to_dict(), quantized_matmuls=len(work) - len(result.kept_fp32),
        kept_fp32_by_fallback=len(result.kept_fp32),
        fp32_share_of_quantizable_work=round(1 - result.int8_share, 4),
        fp32_share_of_all_matmul_work=round(1 - quantized_work / all_work, 4),
        tensorrt_ready=result.tensorrt_ready, tensorrt_refusal=details["tensorrt_refusal"],
        smoothing=result.smoothing, quantize_seconds=round(result.quantize_seconds, 2),
        wall_seconds=round(time.perf_counter() - started, 2),
        size_mb=round(result.path.stat().st_size / 1e6, 2),
        fallback_steps=[{k: v for k, v in s.items() if k != "gate"}
                        | {"agreement": s["gate"]["agreement"]} for s in result.fallback_steps],
        fallback_stopped=result.stopped)
    log(f"{variant.name}{' + fallback' if fallback else ''}: {result.report.summary()}; "
        f"FP32 share {variant.fp32_share_of_quantizable_work:.1%}; TensorRT-ready "
        f"{variant.tensorrt_ready}; {variant.wall_seconds:.0f} s")
    return variant, result.path


@contextlib.contextmanager
def timing_lock():
    with open(TIMING_LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def time_all(source: Path, variants: list[tuple[Variant, Path]], batches: list[int],
             image_size: tuple[int, int], warmup: int, iters: int) -> dict[str, dict]:
    """Median ms of FP32 ORT and each INT8 graph per batch; INT8 rows get x FP32.

    Round-robin: each of the `iters` rounds calls every session once, FP32 first, so a
    change in the machine's load during the run (other work on shared cores) falls on
    every session alike instead of on whichever was timed then."""
    sessions = [("onnxruntime fp32", OnnxSession(source))]
    sessions += [(v.name + (" + fallback" if v.fallback else ""), OnnxSession(p))
                 for v, p in variants]
    fp32_rows = {}
    rng = np.random.default_rng(0)
    with timing_lock():
        log("timing lock taken")
        for batch in batches:
            pixels = rng.standard_normal((batch, 3, *image_size), dtype=np.float32)
            for _ in range(warmup):
                for _, session in sessions:
                    session(pixels)
            times: list[list[float]] = [[] for _ in sessions]
            for _ in range(iters):
                for index, (_, session) in enumerate(sessions):
                    started = time.perf_counter()
                    session(pixels)
                    times[index].append((time.perf_counter() - started) * 1e3)
            medians = [float(np.median(t)) for t in times]
            fp32_rows[str(batch)] = {"median_ms": round(medians[0], 2),
                                     "p90_ms": round(float(np.percentile(times[0], 90)), 2)}
            log(f"batch {batch}: onnxruntime fp32 {medians[0]:.1f} ms")
            for (variant, _), (label, _), median, row in zip(variants, sessions[1:],
                                                              medians[1:], times[1:],
                                                              strict=True):
                variant.timings[str(batch)] = {
                    "median_ms": round(median, 2),
                    "p90_ms": round(float(np.percentile(row, 90)), 2),
                    "speedup_vs_onnxruntime_fp32": round(medians[0] / median, 3)}
                log(f"batch {batch}: {label} {median:.1f} ms ({medians[0] / median:.2f}x)")
    return fp32_rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--fallback", default="",
                        help="methods also measured with the gate's fallback (comma-separated)")
    parser.add_argument("--fallback-best", type=int, default=1,
                        help="also the N methods that failed the gate with the highest "
                             "agreement (the fallback is slow: minutes a step at this size)")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--calib-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    run_dir = RunDir(args.run)
    run = load_run_config(run_dir)
    record = verified_record(run_dir, "onnx")
    source = run_dir.export_dir / record.main_file
    reference, _ = load_model(run_dir.root)
    preprocessor = reference.backbone.preprocessor
    log("gate data (FP32 PyTorch labels)")
    data = gate_data(run, reference, preprocessor)
    reader = calibration_reader(run, preprocessor, args.calib, args.calib_seed)
    flops = count_flops(source)
    all_work = flops.by_op.get("MatMul", 0) + flops.by_op.get("Gemm", 0)
    log(f"{len(data)} gate images ({int((data.labels >= 0).sum())} labelled); "
        f"{len(reader.pixels)} calibration images; MatMul/Gemm work "
        f"{all_work / 1e9:.2f} GFLOP per image")
    names = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="int8-real-") as tmp:
        workdir = Path(tmp)
        built = []
        for name in names:
            # `all_work` counts 2 FLOPs per multiply-add, `Quantizer.work` multiply-adds
            built.append(build_variant(name, source, workdir, data, reader, run_dir, False,
                                       all_work / 2, lambda: reader.pixels))
        failed = sorted((v for v, _ in built if not v.gate["passed"]),
                        key=lambda v: -v.gate["agreement"])
        wanted = [n for n in args.fallback.split(",") if n]
        wanted += [v.name for v in failed[:args.fallback_best] if v.name not in wanted]
        for name in wanted:
            built.append(build_variant(name, source, workdir, data, reader, run_dir, True,
                                       all_work / 2, lambda: reader.pixels))
        height, width = preprocessor.image_size
        batches = [int(b) for b in args.batch.split(",")]
        fp32_timings = time_all(source, built, batches, (height, width), args.warmup,
                                args.iters)
    result = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": _machine(), "versions": installed_versions(_VERSIONED),
        "run": str(args.run), "backbone": run.backbone.spec, "adapter": run.adapter,
        "note": "real pretrained weights (DINOv2-S/14 + all-MiniLM-L6-v2); other work may "
                "have shared the 2 CPU cores during quantization (timings ran under the "
                "timing lock)",
        "gate_images": {"images": len(data), "labelled": int((data.labels >= 0).sum()),
                        "split": data.split},
        "calibration": {"images": len(reader.pixels), "seed": args.calib_seed,
                        "split": "train"},
        "matmul_gflop_per_image": round(all_work / 1e9, 3),
        "settings": {"batches": batches, "warmup": args.warmup, "iters": args.iters,
                     "gate_bounds": asdict(GateBounds()),
                     "max_fp32_share": int8.MAX_FP32_SHARE},
        "onnxruntime_fp32": fp32_timings,
        "variants": [asdict(v) for v, _ in built],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
