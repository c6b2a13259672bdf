"""Few-shot learning comparison: linear probe, LoRA, HMMoE and GA-Net on one frozen backbone.

    python benchmarks/learning_comparison.py [--shots 4,16,0] [--seeds 0,1,2]

Every adapter trains with the same recipe on the same splits (shots 0 = the full training
pool); for each (shots, seed) the split seed and the training seed are both `seed`. The
checkpoint kept is the best on validation; its test accuracy is reported once. Writes
benchmarks/results/<date>-<host>-learning.json and a markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
from pathlib import Path

from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.trainers.run import new_run, run_training

# adapter -> its options; every one trains with RECIPE (one recipe, no per-adapter tuning)
ADAPTERS = {
    "linear-probe": {},
    "lora": {"rank": 4},
    "hmmoe": {"rank": 4, "num_layers": 2},
    "ganet": {"rank": 16},
}
RECIPE = {"few_shot_epochs": 30, "full_epochs": 3, "lr": 3e-3, "batch_size": 32}


def train_one(adapter: str, shots: int, seed: int, backbone: str, workdir: Path) -> dict:
    epochs = RECIPE["full_epochs"] if shots == 0 else RECIPE["few_shot_epochs"]
    prepared = new_run(
        workdir / f"{adapter}-{shots}-{seed}", adapter, ADAPTERS[adapter],
        BackboneConfig(spec=backbone), DataConfig(source="demo", shots=shots, split_seed=seed),
        TrainConfig(epochs=epochs, lr=RECIPE["lr"], batch_size=RECIPE["batch_size"],
                    seed=seed))
    result = run_training(prepared)
    return {"adapter": adapter, "shots": shots, "seed": seed,
            "val_accuracy": result.best_val_accuracy, "test_accuracy": result.test_accuracy,
            "trainable": result.parameters["trainable"],
            "trainable_share": result.parameters["trainable_share"],
            "steps": result.steps, "seconds": round(result.seconds, 1)}


def table(rows: list[dict], shots: list[int]) -> str:
    label = {s: ("full" if s == 0 else f"{s}-shot") for s in shots}
    lines = ["| adapter | trainable params | " + " | ".join(label[s] for s in shots) + " |",
             "|---|---:|" + "---:|" * len(shots)]
    for adapter in ADAPTERS:
        cells = []
        for s in shots:
            accs = [100 * r["test_accuracy"] for r in rows
                    if r["adapter"] == adapter and r["shots"] == s]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1f} ± {spread:.1f}")
        params = next(r for r in rows if r["adapter"] == adapter)
        lines.append(f"| {adapter} | {params['trainable']:,} "
                     f"({100 * params['trainable_share']:.1f}%) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", default="4,16,0", help="comma-separated; 0 = full")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    shots = [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmdeploy-learning-") as workdir:
        for s in shots:
            for seed in seeds:
                for adapter in ADAPTERS:
                    rows.append(train_one(adapter, s, seed, args.backbone, Path(workdir)))
                    print(json.dumps(rows[-1]), flush=True)
    markdown = table(rows, shots)
    stem = f"{datetime.date.today().isoformat()}-{platform.node()}-learning"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"backbone": args.backbone, "data": "demo", "recipe": RECIPE, "adapters": ADAPTERS,
         "metric": "test accuracy of the best-on-validation checkpoint, mean ± std over "
                   "seeds", "rows": rows}, indent=2))
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
