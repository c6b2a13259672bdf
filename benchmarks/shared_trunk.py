"""Many adapters on one trunk against one predictor per adapter (issue 19), in one process.

    HF_HUB_OFFLINE=1 python benchmarks/shared_trunk.py --adapters 1,2,4,8 --iters 5

On the ViT-B/16-sized bench backbone (`mmdeploy.bench.vit_b16`: random weights, the cost of
the real shapes) on ONNX Runtime, CPU:

1. Two runs, HMMoE (its defaults: the last 4 of 12 blocks) and GA-Net, each trained for
   one step (their weights only need to be non-zero), exported to ONNX on their own. The N
   adapters are copies of these two runs under N names, HMMoE and GA-Net alternating
   (hmmoe-0, ganet-1, hmmoe-2, ...): each copy gets its own branch file and its own
   session, and its own trainable weights (the base run's, shifted by a constant per copy:
   the runtime shares weights between branches by content, so equal copies would share
   their adapters too; speed depends on shapes, not on values).
2. `export --shared` of the first N-1 (max N) adapters: one trunk (the tower up to block 8,
   where the HMMoE runs start adapting) and a branch each, each verified through the trunk
   (`exporters.shared.export_shared`). The last adapter is then added as a live server adds
   one (`exporters.shared.add_to_shared`, then `SharedPredictor.add_branch`, then its first
   prediction): the hot-add latency, request to first answer, without the HTTP round trip.
3. For each configuration, loaded alone: the single adapter (hmmoe-0's own export, one
   session), the shared trunk serving the first N adapters (`SharedPredictor`), and N
   separate predictors (N sessions of the full model, one per adapter). Peak memory is the
   highest resident set size sampled every 5 ms while the configuration loads and runs,
   less the process's size just before it loaded (memory is handed back between
   configurations with gc and malloc_trim); throughput is images/s over batches of
   `--batch` random images (`--warmup` batches, then the median of `--iters`), in two
   workloads:
   - `mixed` (a server's batch): image i asks adapter i mod N. Shared: the trunk once over
     the batch, each branch over its own images. Separate: each image through its own
     adapter's full model (the batch split by adapter).
   - `every` (batch inference over N runs): every image asks every adapter. Shared: the
     trunk once, every branch over the whole batch. Separate: every model over the batch.

Ratios are against the single adapter measured in the same process. Steps 1 and 2's
exports are kept under --work and reused (`--prepare-only` makes them and stops, so that
the timed part can run alone under a timing lock); the hot add goes into a fresh copy of
the shared export each time. Writes
benchmarks/results/<date>-<host>-shared-trunk-vit-b16.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from report import write_report

from mmdeploy.artifacts import (
    RunDir,
    atomic_write_json,
    load_safetensors,
    read_json,
    safetensors_metadata,
    save_safetensors,
    sha256_file,
)
from mmdeploy.backbone import default_cache_dir
from mmdeploy.bench.vit_b16 import checkpoint_dir
from mmdeploy.config import BackboneConfig, DataConfig, ExportConfig, TrainConfig
from mmdeploy.runtime.memory import release_freed_memory
from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor
from mmdeploy.runtime.shared import SharedPredictor

KINDS = ("hmmoe", "ganet")


def base_run(folder: Path, adapter: str, batch_max: int) -> Path:
    """A one-step `adapter` run on the ViT-B/16-sized backbone, exported to ONNX; reused."""
    from mmdeploy.exporters.export import export_run
    from mmdeploy.trainers.run import new_run, run_training

    out = folder / f"base-{adapter}"
    if (out / "export" / "manifest.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    prepared = new_run(out, adapter, {}, BackboneConfig(spec=str(checkpoint_dir())),
                       DataConfig(source="demo", shots=1, val_per_class=1, test_per_class=1),
                       TrainConfig(epochs=1, max_steps=1, batch_size=10))
    run_training(prepared)
    export_run(out, ExportConfig(formats=("onnx",), batch_min=1, batch_opt=batch_max,
                                 batch_max=batch_max), log=print)
    return out


def adapter_runs(folder: Path, bases: dict[str, Path], count: int) -> list[Path]:
    """`count` adapters: copies of the base runs (without their exports), alternating, each
    with its own trainable weights (`distinct_weights`)."""
    runs = []
    for k in range(count):
        kind = KINDS[k % 2]
        path = folder / f"{kind}-{k}"
        if not path.exists():
            staging = folder / f".{path.name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(bases[kind], staging, ignore=shutil.ignore_patterns("export"))
            distinct_weights(staging, k)
            staging.rename(path)
        runs.append(path)
    return runs


def distinct_weights(run: Path, k: int) -> None:
    """Shift every trainable weight of copy `k` by (k + 1) * 1e-3 and record the new sha256.

    The serving side shares weights between branch sessions by content (the frozen blocks
    every branch carries); copies with equal trainable weights would share those too and
    flatter the memory figures. Shifted, each copy's adapter weights are its own, as two
    trained runs' would be, and the frozen weights (not in the run's weights file) stay
    the backbone's."""
    run_dir = RunDir(run)
    state = {name: tensor + (k + 1) * 1e-3 if tensor.is_floating_point() else tensor
             for name, tensor in load_safetensors(run_dir.weights_path).items()}
    save_safetensors(run_dir.weights_path, state, safetensors_metadata(run_dir.weights_path))
    config = read_json(run_dir.config_path)
    config["weights_sha256"] = sha256_file(run_dir.weights_path)
    atomic_write_json(run_dir.config_path, config)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class PeakMemory:
    """The highest resident set size sampled every 5 ms while in the block, in MB above the
    size on entry."""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        release_freed_memory()
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def mb(self) -> float:
        return self.peak - self.start


def images_per_second(step: Callable[[], object], images: int, warmup: int,
                      iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return images / statistics.median(times)


def speeds(kind: str, loaded, names: list[str], pixels: np.ndarray, warmup: int,
           iters: int) -> dict[str, float]:
    """images/s of a loaded configuration in both workloads (module docstring)."""
    batch = len(pixels)
    if kind == "shared":
        mixed = list(enumerate(names[i % len(names)] for i in range(batch)))
        every = [(i, name) for i in range(batch) for name in names]
        steps = {"mixed": lambda: loaded.logits(pixels, mixed),
                 "every": lambda: loaded.logits(pixels, every)}
    else:  # one predictor per adapter, in the order of `names`
        def split() -> None:
            for k, predictor in enumerate(loaded):
                if rows := [i for i in range(batch) if i % len(loaded) == k]:
                    predictor.run_pixels(pixels[rows])

        steps = {"mixed": split,
                 "every": lambda: [predictor.run_pixels(pixels) for predictor in loaded]}
    return {name: round(images_per_second(step, batch, warmup, iters), 2)
            for name, step in steps.items()}


def workloads(kind: str, load: Callable[[], object], names: list[str], pixels: np.ndarray,
              warmup: int, iters: int) -> dict:
    """Load one configuration, run both workloads, with its peak memory; unloaded after."""
    with PeakMemory() as memory:
        started = time.perf_counter()
        loaded = load()
        load_seconds = time.perf_counter() - started
        measured = speeds(kind, loaded, names, pixels, warmup, iters)
        loaded = None
    gc.collect()
    release_freed_memory()
    return {"kind": kind, "adapters": len(names), "peak_mb": round(memory.mb, 1),
            "load_seconds": round(load_seconds, 2), "images_per_second": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="1,2,4,8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--work", type=Path,
                        default=default_cache_dir() / "shared-trunk-bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()
    from mmdeploy.exporters.shared import add_to_shared, export_shared

    counts = sorted(int(n) for n in args.adapters.split(","))
    phases: dict[str, float] = {}
    started = time.perf_counter()
    bases = {kind: base_run(args.work, kind, args.batch) for kind in KINDS}
    phases["base runs"] = time.perf_counter() - started
    runs = adapter_runs(args.work, bases, max(counts))
    names = [run.name for run in runs]
    prepared = args.work / f"shared-{len(runs) - 1}"
    if not (prepared / "manifest.json").exists():
        started = time.perf_counter()
        export_shared(runs[:-1], prepared, ExportConfig(formats=("onnx",), batch_min=1,
                                                        batch_opt=args.batch,
                                                        batch_max=args.batch), log=print)
        phases[f"export --shared of {len(runs) - 1} adapters"] = time.perf_counter() - started
    if args.prepare_only:
        return
    shared_dir = args.work / f"shared-{len(runs)}"
    shutil.rmtree(shared_dir, ignore_errors=True)
    shutil.copytree(prepared, shared_dir)

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    predictor = SharedPredictor(shared_dir)
    started = time.perf_counter()
    added = add_to_shared(shared_dir, runs[-1], log=print)
    export_done = time.perf_counter()
    predictor.add_branch(added)
    predictor.logits(pixels[:1], [(0, added)])
    hot_add = {"adapter": added, "seconds": round(time.perf_counter() - started, 2),
               "export_and_verify_seconds": round(export_done - started, 2),
               "trunk_adapters_before": len(runs) - 1}
    print(f"hot add of {added}: {hot_add['seconds']} s to its first answer")
    del predictor
    gc.collect()

    results = [workloads("single", lambda: [OnnxRuntimePredictor(bases["hmmoe"])],
                         ["hmmoe-0"], pixels, args.warmup, args.iters)]
    for count in counts:
        results.append(workloads("shared", lambda n=count: SharedPredictor(
            shared_dir, runs=names[:n]), names[:count], pixels, args.warmup, args.iters))
        if count > 1:
            results.append(workloads("separate", lambda n=count: [
                OnnxRuntimePredictor(bases[KINDS[k % 2]]) for k in range(n)],
                names[:count], pixels, args.warmup, args.iters))
        print(results[-2:])
    single = results[0]
    for row in results:
        row["x_single_images_per_second"] = {
            k: round(v / single["images_per_second"][k], 3)
            for k, v in row["images_per_second"].items()}
        row["x_single_memory"] = round(row["peak_mb"] / single["peak_mb"], 3)
    eight = next((r for r in results if r["kind"] == "shared" and r["adapters"] == 8), None)
    report = {
        "date": str(datetime.date.today()), "host": platform.node(),
        "cpu_count": os.cpu_count(), "backbone": "vit-b16 (random weights)",
        "backend": "onnxruntime CPU", "batch": args.batch, "warmup": args.warmup,
        "iters": args.iters, "adapters": names,
        "note": "adapters are copies of one HMMoE and one GA-Net run (one training step "
                "each) under distinct names: own branch files and sessions, trainable "
                "weights shifted by a constant per copy",
        "trunk_block": SharedPredictor(shared_dir, runs=names[:1])._trunk_record
        .details["block"],
        "hot_add": hot_add, "results": results,
        "targets": None if eight is None else {
            "shared_8_x_single_images_per_second_mixed":
                eight["x_single_images_per_second"]["mixed"],
            "shared_8_x_single_memory": eight["x_single_memory"],
            "met": eight["x_single_images_per_second"]["mixed"] >= 0.8
            and eight["x_single_memory"] <= 1.5},
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    else:
        write_report("shared-trunk-vit-b16", report)


if __name__ == "__main__":
    main()
