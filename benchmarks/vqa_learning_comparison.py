"""Learning comparison on easy-VQA (image + question -> answer): the pooled-feature baselines,
LoRA, HMMoE and GA-Net on one frozen backbone, in the same trainer.

    python benchmarks/vqa_learning_comparison.py --backbone tiny --shots 16,0 --lrs 3e-3
    python benchmarks/vqa_learning_comparison.py --backbone real --shots 16 --lrs 1e-3 \
        --adapters question-only,image-only,late-fusion,late-fusion-mlp,product-fusion,ganet

Every model trains on the same splits of easy-VQA (`--data easy-vqa`: the package's train
split gives train and validation, 20 questions per answer, disjoint images; its test split,
9,673 questions, is the test set); shots = questions per answer, 0 = the whole training
pool. For each (shots, seed) the split seed and the training seed are both `seed`. The
learning rate is swept on the first seed as in `learning_comparison.py` (ascending, stop at
the first rate worse on validation than the one before, keep the best on validation), the
other seeds train with it. The checkpoint kept is the best on validation; its test accuracy
is reported once. `--backbone real` is the DINOv2-S + MiniLM pair
(`python -m mmdeploy.bench.real_pair`), models at their defaults fitted to the towers.
Writes benchmarks/results/<date>-<host>-vqa-<backbone>[-<tag>].json and a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

from learning_comparison import add_arguments, compare, result_row, settings, table

from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.data import EASY_VQA
from mmdeploy.trainers.run import new_run, run_training

ADAPTERS = ("question-only", "image-only", "late-fusion", "late-fusion-mlp", "product-fusion",
            "lora", "hmmoe", "ganet")
# Models on pooled features train on cached features: a step costs milliseconds.
HEADS = ("question-only", "image-only", "late-fusion", "late-fusion-mlp", "product-fusion",
         "ganet")
OPTIONS = {"tiny": {"lora": {"rank": 4}, "hmmoe": {"rank": 4, "num_layers": 2},
                    "ganet": {"rank": 16}}}
RECIPES = {"tiny": {"few_shot_epochs": dict.fromkeys(ADAPTERS, 20),
                    "full_epochs": dict.fromkeys(ADAPTERS, 1),
                    "batch_size": 32, "val_per_class": 20},
           "real": {"few_shot_epochs": {a: 100 if a in HEADS else 10 for a in ADAPTERS},
                    "full_epochs": {a: 10 if a in HEADS else 1 for a in ADAPTERS},
                    "batch_size": 32, "val_per_class": 20}}


def train_one(adapter: str, shots: int, seed: int, lr: float, spec: str, backbone: str,
              options: dict, workdir: Path) -> dict:
    recipe = RECIPES[backbone]
    epochs = recipe["full_epochs" if shots == 0 else "few_shot_epochs"][adapter]
    prepared = new_run(
        workdir / f"{adapter}-{shots}-{seed}-{lr:g}", adapter, options.get(adapter, {}),
        BackboneConfig(spec=spec),
        DataConfig(source=EASY_VQA, shots=shots, split_seed=seed,
                   val_per_class=recipe["val_per_class"]),
        TrainConfig(epochs=epochs, lr=lr, batch_size=recipe["batch_size"], seed=seed))
    return result_row(adapter, shots, seed, lr, run_training(prepared))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, sorted(RECIPES), ADAPTERS, shots="16,0", lrs="1e-3,1e-2")
    args = parser.parse_args()
    adapters, shots, seeds, lrs, options, spec = settings(args, OPTIONS)
    stem = f"{datetime.date.today().isoformat()}-{platform.node()}-vqa-{args.backbone}"
    stem += f"-{args.tag}" if args.tag else ""
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmdeploy-vqa-learning-") as workdir:
        rows = compare(adapters, shots, seeds, lrs, spec, args.backbone, options,
                       Path(workdir), train_one, args.out / f"{stem}.rows.jsonl")
    shown = [a for a in ADAPTERS if any(r["adapter"] == a for r in rows)]
    markdown = table(rows, shown, sorted({r["shots"] for r in rows}, key=lambda s: s or 1e9))
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"backbone": args.backbone, "data": EASY_VQA, "recipe": RECIPES[args.backbone],
         "options": options, "lrs": lrs, "seeds": seeds,
         "metric": "test accuracy (easy-VQA's test split, 9,673 questions) of the "
                   "best-on-validation checkpoint, mean ± std over seeds, at the learning "
                   "rate chosen on validation (first seed)",
         "rows": rows}, indent=2))
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
