"""Few-shot learning comparison: linear probe, LoRA, HMMoE, GA-Net and zero-shot on one frozen
backbone.

    python benchmarks/learning_comparison.py --backbone real --shots 16 --seeds 0,1,2 \
        --lrs 1e-3,1e-2
    python benchmarks/learning_comparison.py --backbone tiny --shots 4,16,0 --lrs 3e-3

Every adapter trains on the same splits of the bundled set (shots 0 = the whole training
pool); for each (shots, seed) the split seed and the training seed are both `seed`. The
learning rate is swept on the first seed: every rate in `--lrs` is trained, the one with the
best validation accuracy (never test) is kept for that adapter and shot count, and the other
seeds train with it alone. The checkpoint kept in a run is the best on validation; its test
accuracy is reported once. `--backbone real` is the DINOv2-S + MiniLM pair
(`python -m mmdeploy.bench.real_pair`), with every adapter at its defaults fitted to the
towers; `tiny` uses the small options below. Writes
benchmarks/results/<date>-<host>-learning-<backbone>.json and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
from pathlib import Path

from mmdeploy.bench.real_pair import real_pair
from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.trainers.run import new_run, run_training

ADAPTERS = ("linear-probe", "lora", "hmmoe", "ganet", "zero-shot")
# backbone -> adapter -> the options it trains with (absent: the defaults, fitted)
OPTIONS = {"tiny": {"lora": {"rank": 4}, "hmmoe": {"rank": 4, "num_layers": 2},
                    "ganet": {"rank": 16}}}
# backbone -> epochs (few-shot, full), batch size, validation and test images per class
RECIPES = {"tiny": {"few_shot_epochs": 30, "full_epochs": 3, "batch_size": 32,
                    "val_per_class": 20, "test_per_class": 50},
           "real": {"few_shot_epochs": 10, "full_epochs": 1, "batch_size": 32,
                    "val_per_class": 10, "test_per_class": 30}}


def train_one(adapter: str, shots: int, seed: int, lr: float, spec: str, backbone: str,
              workdir: Path) -> dict:
    recipe = RECIPES[backbone]
    epochs = recipe["full_epochs"] if shots == 0 else recipe["few_shot_epochs"]
    prepared = new_run(
        workdir / f"{adapter}-{shots}-{seed}-{lr:g}", adapter,
        OPTIONS.get(backbone, {}).get(adapter, {}), BackboneConfig(spec=spec),
        DataConfig(source="demo", shots=shots, split_seed=seed,
                   val_per_class=recipe["val_per_class"],
                   test_per_class=recipe["test_per_class"]),
        TrainConfig(epochs=epochs, lr=lr, batch_size=recipe["batch_size"], seed=seed))
    result = run_training(prepared)
    return {"adapter": adapter, "shots": shots, "seed": seed, "lr": lr,
            "val_accuracy": result.best_val_accuracy, "test_accuracy": result.test_accuracy,
            "trainable": result.parameters["trainable"],
            "trainable_share": result.parameters["trainable_share"],
            "steps": result.steps, "seconds": round(result.seconds, 1),
            "phase_seconds": result.phase_seconds}


def compare(adapters: list[str], shots: list[int], seeds: list[int], lrs: list[float],
            spec: str, backbone: str, workdir: Path) -> list[dict]:
    """Every row trained; `kept` marks the runs of the chosen rate (all but the sweep's)."""
    rows = []

    def run(adapter, s, seed, lr):
        rows.append(train_one(adapter, s, seed, lr, spec, backbone, workdir))
        print(json.dumps(rows[-1]), flush=True)
        return rows[-1]

    for s in shots:
        for adapter in adapters:
            sweep = [run(adapter, s, seeds[0], lr) for lr in lrs]
            best = max(sweep, key=lambda row: row["val_accuracy"])  # first on ties
            best["kept"] = True
            for seed in seeds[1:]:
                run(adapter, s, seed, best["lr"])["kept"] = True
    return rows


def table(rows: list[dict], adapters: list[str], shots: list[int]) -> str:
    label = {s: ("full" if s == 0 else f"{s}-shot") for s in shots}
    lines = ["| adapter | trainable params | " + " | ".join(
                f"{label[s]} | lr" for s in shots) + " |",
             "|---|---:|" + "---:|---:|" * len(shots)]
    for adapter in adapters:
        cells = []
        for s in shots:
            kept = [r for r in rows if r["adapter"] == adapter and r["shots"] == s
                    and r.get("kept")]
            accs = [100 * r["test_accuracy"] for r in kept]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1f} ± {spread:.1f} | {kept[0]['lr']:g}")
        params = next(r for r in rows if r["adapter"] == adapter)
        lines.append(f"| {adapter} | {params['trainable']:,} "
                     f"({100 * params['trainable_share']:.1f}%) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="real", choices=sorted(RECIPES))
    parser.add_argument("--adapters", default=",".join(ADAPTERS))
    parser.add_argument("--shots", default="4,16", help="comma-separated; 0 = full")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default="1e-3,1e-2", help="the sweep, on the first seed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    adapters = args.adapters.split(",")
    shots = [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(lr) for lr in args.lrs.split(",")]
    spec = real_pair().spec if args.backbone == "real" else args.backbone
    with tempfile.TemporaryDirectory(prefix="mmdeploy-learning-") as workdir:
        rows = compare(adapters, shots, seeds, lrs, spec, args.backbone, Path(workdir))
    markdown = table(rows, adapters, shots)
    stem = f"{datetime.date.today().isoformat()}-{platform.node()}-learning-{args.backbone}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"backbone": args.backbone, "data": "demo", "recipe": RECIPES[args.backbone],
         "options": OPTIONS.get(args.backbone, {}), "lrs": lrs, "seeds": seeds,
         "metric": "test accuracy of the best-on-validation checkpoint, mean ± std over "
                   "seeds, at the learning rate chosen on validation (first seed)",
         "rows": rows}, indent=2))
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
