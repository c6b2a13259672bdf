"""ONNX Runtime (CPU) vs PyTorch eager on one run, in one process: median latencies and ratios.

    python benchmarks/onnx_vs_eager.py runs/hmmoe-demo --batch 1,32

Writes benchmarks/results/<date>-<host>-onnx_vs_eager.json. Also times the frozen backbone
alone (the zero-shot model, eager) so the adapter's own cost shows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mmdeploy.backbone import load_backbone
from mmdeploy.models.baselines.model import ZeroShotModel
from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor
from mmdeploy.runtime.torch import TorchPredictor


def median_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    eager, ort = TorchPredictor(args.run, device="cpu"), OnnxRuntimePredictor(args.run)
    frozen = ZeroShotModel(load_backbone(eager.run.backbone), None, eager.class_names,
                           eager.run.data.prompt_template).eval()
    height, width = eager.preprocessor.image_size
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        pixels = np.random.default_rng(0).standard_normal((batch, 3, height, width),
                                                          dtype=np.float32)
        with torch.inference_mode():
            frozen_ms = median_ms(lambda p=pixels: frozen(torch.from_numpy(p)), args.repeats)
        eager_ms = median_ms(lambda p=pixels: eager.run_pixels(p), args.repeats)
        ort_ms = median_ms(lambda p=pixels: ort.run_pixels(p), args.repeats)
        rows.append({"batch": batch, "eager_ms": eager_ms, "onnxruntime_ms": ort_ms,
                     "frozen_backbone_eager_ms": frozen_ms,
                     "onnxruntime_speedup_vs_eager": eager_ms / ort_ms,
                     "adapter_overhead_eager": eager_ms / frozen_ms})
        print(f"batch {batch:3d}: eager {eager_ms:.2f} ms, onnxruntime {ort_ms:.2f} ms "
              f"({eager_ms / ort_ms:.2f}x), frozen backbone eager {frozen_ms:.2f} ms")
    out = Path(__file__).parent / "results" / (
        f"{datetime.date.today()}-{platform.node()}-onnx_vs_eager.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"run": str(args.run), "adapter": eager.run.adapter,
                               "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
