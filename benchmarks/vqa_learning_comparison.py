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
Each run is then asked the paraphrased questions of `vqa_paraphrases.py` (questions worded
unlike the 107 templates) on `--paraphrase-images` test images. The towers' features persist
in `--feature-store` (`train --feature-store`): the test split's images go through the
image tower once for the whole comparison, not once a run. Writes
benchmarks/results/<date>-<host>-vqa-<backbone>[-<tag>].json and a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

from learning_comparison import add_arguments, compare, result_row, settings, table
from vqa_paraphrases import paraphrase_accuracy

from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.data import EASY_VQA
from mmdeploy.runs import load_model
from mmdeploy.trainers.run import new_run, run_training

STORE = Path("~/.cache/mm-peft-deploy/feature-store").expanduser()

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
              options: dict, workdir: Path, store: Path | None = None,
              paraphrase_images: int = 0) -> dict:
    recipe = RECIPES[backbone]
    epochs = recipe["full_epochs" if shots == 0 else "few_shot_epochs"][adapter]
    prepared = new_run(
        workdir / f"{adapter}-{shots}-{seed}-{lr:g}", adapter, options.get(adapter, {}),
        BackboneConfig(spec=spec),
        DataConfig(source=EASY_VQA, shots=shots, split_seed=seed,
                   val_per_class=recipe["val_per_class"]),
        TrainConfig(epochs=epochs, lr=lr, batch_size=recipe["batch_size"], seed=seed,
                    feature_store=str(store) if store else None))
    row = result_row(adapter, shots, seed, lr, run_training(prepared))
    if paraphrase_images:
        model, run = load_model(prepared.run_dir.root)
        row["paraphrases"] = paraphrase_accuracy(model, run.class_names, paraphrase_images)
    shutil.rmtree(prepared.run_dir.root)  # a full-split run's checkpoints are large
    return row


def paraphrase_table(rows: list[dict], adapters: list[str], shots: list[int]) -> str:
    """Accuracy on the paraphrased questions beside the template questions of the same
    images (kept runs, mean over seeds)."""
    label = {s: ("full" if s == 0 else f"{s}-shot") for s in shots}
    lines = ["| adapter | " + " | ".join(f"{label[s]}: templates | paraphrases"
                                        for s in shots) + " |",
             "|---|" + "---:|---:|" * len(shots)]
    for adapter in adapters:
        cells = []
        for s in shots:
            kept = [r["paraphrases"] for r in rows if r["adapter"] == adapter
                    and r["shots"] == s and r.get("kept") and "paraphrases" in r]
            cells.append(" | ".join(
                f"{100 * statistics.mean(k[name] for k in kept):.1f}" if kept else "–"
                for name in ("templates", "paraphrases")))
        lines.append(f"| {adapter} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, sorted(RECIPES), ADAPTERS, shots="16,0", lrs="1e-3,1e-2")
    parser.add_argument("--feature-store", type=Path, default=STORE,
                        help="where the towers' features persist between runs (`train "
                             "--feature-store`); every run after the first on a split reads "
                             "them")
    parser.add_argument("--paraphrase-images", type=int, default=100,
                        help="test images asked the paraphrased questions of "
                             "vqa_paraphrases.py after each run (0: none)")
    args = parser.parse_args()
    adapters, shots, seeds, lrs, options, spec = settings(args, OPTIONS)
    stem = f"{datetime.date.today().isoformat()}-{platform.node()}-vqa-{args.backbone}"
    stem += f"-{args.tag}" if args.tag else ""
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmdeploy-vqa-learning-") as workdir:
        train = functools.partial(train_one, store=args.feature_store,
                                  paraphrase_images=args.paraphrase_images)
        rows = compare(adapters, shots, seeds, lrs, spec, args.backbone, options,
                       Path(workdir), train, args.out / f"{stem}.rows.jsonl")
    shown = [a for a in ADAPTERS if any(r["adapter"] == a for r in rows)]
    settings_shown = sorted({r["shots"] for r in rows}, key=lambda s: s or 1e9)
    markdown = table(rows, shown, settings_shown)
    if args.paraphrase_images:
        markdown += ("\n\nParaphrased questions (vqa_paraphrases.py), accuracy in %:\n\n"
                     + paraphrase_table(rows, shown, settings_shown))
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
