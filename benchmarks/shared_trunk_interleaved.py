"""The shared trunk's speed against the single adapter, interleaved batch by batch.

    python benchmarks/shared_trunk.py --prepare-only   # the runs and the shared export
    flock /tmp/mmdeploy-timing.lock python benchmarks/shared_trunk_interleaved.py --rounds 6

`shared_trunk.py` times each configuration on its own, one after another; on a machine
whose load changes from minute to minute its ratios move with the load. Here the single
adapter (hmmoe-0's own export) and one `SharedPredictor` holding all 8 branches are loaded
together and timed in turn, one batch of 8 random images each per round: the single adapter,
the shared trunk with image i asking adapter i mod 8 (`mixed`), and with every image asking
hmmoe-0 (the work of the single adapter, through trunk and branch). Medians over the rounds,
after one warm-up each. Writes benchmarks/results/<date>-<host>-shared-trunk-interleaved.json
(or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from report import write_report

from mmdeploy.backbone import default_cache_dir
from mmdeploy.runtime.onnxruntime import OnnxRuntimePredictor
from mmdeploy.runtime.shared import SharedPredictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--work", default=str(default_cache_dir() / "shared-trunk-bench"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shared = SharedPredictor(f"{args.work}/shared-8")
    single = OnnxRuntimePredictor(f"{args.work}/base-hmmoe")
    names = shared.runs
    pixels = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    steps = {"single": lambda: single.run_pixels(pixels),
             "shared-8 mixed": lambda: shared.logits(pixels, list(enumerate(names))),
             "shared, all hmmoe-0": lambda: shared.logits(
                 pixels, [(i, "hmmoe-0") for i in range(len(pixels))])}
    for step in steps.values():
        step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    speed = {name: len(pixels) / statistics.median(times) for name, times in seconds.items()}
    report = {"rounds": args.rounds, "batch": len(pixels), "adapters": names,
              "images_per_second": {k: round(v, 2) for k, v in speed.items()},
              "x_single": {k: round(v / speed["single"], 3) for k, v in speed.items()},
              "seconds": {k: [round(t, 3) for t in v] for k, v in seconds.items()}}
    print(report["images_per_second"], report["x_single"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    else:
        write_report("shared-trunk-interleaved", report)


if __name__ == "__main__":
    main()
