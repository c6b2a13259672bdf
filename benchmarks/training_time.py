"""Seconds per training run with and without the frozen-prefix cache, in one process.

    python benchmarks/training_time.py [--backbone real] [--adapters linear-probe,ganet,hmmoe]

`--backbone real` is the DINOv2-S + MiniLM pair (`python -m mmdeploy.bench.real_pair`,
built on first use); any other value is a backbone spec. Each adapter trains the same
16-shot run of the bundled set (the `train` defaults: 10 epochs, batch 32, lr 1e-3, val 20
and test 50 per class) twice, with the cache and with `--no-cache`, one after the other in
this process; reported per run: the seconds of each phase (prepare: model, decoding and the
cache; train: the steps and the validation passes; test: the final test pass, which always
runs the whole model), the test accuracy, and the largest difference between the two runs'
adapter weights. Writes benchmarks/results/<date>-<host>-training_time.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from report import write_report

from mmdeploy.artifacts import load_safetensors
from mmdeploy.bench.real_pair import real_pair
from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.trainers.run import new_run, run_training


def train_once(adapter: str, spec: str, cache: bool, out: Path, shots: int) -> dict:
    prepared = new_run(out, adapter, {}, BackboneConfig(spec=spec),
                       DataConfig(source="demo", shots=shots),
                       TrainConfig(cache_features=cache))
    result = run_training(prepared)
    return {"adapter": adapter, "cache": cache, "seconds": round(result.seconds, 1),
            "phase_seconds": result.phase_seconds, "steps": result.steps,
            "test_accuracy": result.test_accuracy, "run": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="real")
    parser.add_argument("--adapters", default="linear-probe,ganet,hmmoe")
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    spec = real_pair().spec if args.backbone == "real" else args.backbone
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmdeploy-training-time-") as workdir:
        for adapter in args.adapters.split(","):
            pair = [train_once(adapter, spec, cache, Path(workdir) / f"{adapter}-{cache}",
                               args.shots) for cache in (True, False)]
            cached, plain = (load_safetensors(Path(r["run"]) / "adapter_model.safetensors")
                             for r in pair)
            gap = max((cached[k] - plain[k]).abs().max().item() for k in cached)
            for row in pair:
                row.update(weights_max_abs_diff=gap, speedup=round(
                    pair[1]["seconds"] / pair[0]["seconds"], 2))
                del row["run"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"backbone": args.backbone, "shots": args.shots, "data": "demo",
              "recipe": TrainConfig().to_dict(), "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    write_report("training_time", report)


if __name__ == "__main__":
    main()
