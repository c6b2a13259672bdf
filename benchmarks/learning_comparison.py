"""Few-shot learning comparison: linear probe, LoRA, HMMoE, GA-Net and zero-shot on one frozen
backbone.

    python benchmarks/learning_comparison.py --backbone real --shots 4,16 --seeds 0,1,2 \
        --lrs 1e-3,1e-2,1e-1
    python benchmarks/learning_comparison.py --backbone real --adapters hmmoe --shots 16 \
        --lrs 1e-3 --set hmmoe.scale=4 --tag hmmoe-scale4      # an ablation
    python benchmarks/learning_comparison.py --backbone tiny --shots 4,16,0 --lrs 3e-3

Every adapter trains on the same splits of the bundled set (shots 0 = the whole training
pool); for each (shots, seed) the split seed and the training seed are both `seed`. The
learning rate is swept on the first seed, in ascending order: each rate in `--lrs` is
trained until one does worse on validation than the rate before it (a larger one would not
be kept either), the rate best on validation (never test) is kept for that adapter and shot
count, and the other seeds train with it alone. The checkpoint kept in a run is the best on
validation; its test accuracy is reported once, so an adapter's epoch count is a ceiling on
its steps, not a fixed length. `--backbone real` is the DINOv2-S + MiniLM pair
(`python -m mmdeploy.bench.real_pair`), with every adapter at its defaults fitted to the
towers; `tiny` uses the small options below. `--reuse` takes the rows of earlier results
files for the (adapter, shots) pairs this run does not train, when its recipe and options for
them were the same. Writes benchmarks/results/<date>-<host>-learning-<backbone>[-<tag>].json
and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from mmdeploy.bench.real_pair import real_pair
from mmdeploy.config import BackboneConfig, DataConfig, TrainConfig
from mmdeploy.trainers.run import new_run, run_training

ADAPTERS = ("linear-probe", "lora", "hmmoe", "ganet", "zero-shot")
# backbone -> adapter -> the options it trains with (absent: the defaults, fitted)
OPTIONS = {"tiny": {"lora": {"rank": 4}, "hmmoe": {"rank": 4, "num_layers": 2},
                    "ganet": {"rank": 16}}}
# backbone -> epochs (few-shot, full), batch size, validation and test images per class.
# On the real pair the adapters that act on pooled features (probe, GA-Net, the projection)
# train on cached features, so a step costs milliseconds and they get 100 epochs; LoRA and
# HMMoE steps cost seconds on 2 cores, so they get 10. A smaller budget for the adapters
# under test can only favour the baselines.
HEADS = ("linear-probe", "ganet", "zero-shot")
RECIPES = {"tiny": {"few_shot_epochs": dict.fromkeys(ADAPTERS, 30), "full_epochs": 3,
                    "batch_size": 32, "val_per_class": 20, "test_per_class": 50},
           "real": {"few_shot_epochs": {a: 100 if a in HEADS else 10 for a in ADAPTERS},
                    "full_epochs": 1, "batch_size": 32, "val_per_class": 10,
                    "test_per_class": 30}}


def train_one(adapter: str, shots: int, seed: int, lr: float, spec: str, backbone: str,
              options: dict, workdir: Path) -> dict:
    recipe = RECIPES[backbone]
    epochs = recipe["full_epochs"] if shots == 0 else recipe["few_shot_epochs"][adapter]
    prepared = new_run(
        workdir / f"{adapter}-{shots}-{seed}-{lr:g}", adapter,
        options.get(adapter, {}), BackboneConfig(spec=spec),
        DataConfig(source="demo", shots=shots, split_seed=seed,
                   val_per_class=recipe["val_per_class"],
                   test_per_class=recipe["test_per_class"]),
        TrainConfig(epochs=epochs, lr=lr, batch_size=recipe["batch_size"], seed=seed))
    return result_row(adapter, shots, seed, lr, run_training(prepared))


def result_row(adapter: str, shots: int, seed: int, lr: float, result) -> dict:
    """One row of the table: a run's settings and what its training gave."""
    return {"adapter": adapter, "shots": shots, "seed": seed, "lr": lr,
            "val_accuracy": result.best_val_accuracy, "test_accuracy": result.test_accuracy,
            "trainable": result.parameters["trainable"],
            "trainable_share": result.parameters["trainable_share"],
            "steps": result.steps, "seconds": round(result.seconds, 1),
            "phase_seconds": result.phase_seconds}


def compare(adapters: list[str], shots: list[int], seeds: list[int], lrs: list[float],
            spec: str, backbone: str, options: dict, workdir: Path,
            train: Callable[..., dict] = train_one, log: Path | None = None) -> list[dict]:
    """Every row trained by `train` (a `train_one`); `kept` marks the runs of the chosen
    rate (all but the sweep's). Each row is printed, and appended to `log` when given, as
    it comes (a long run can be read while it goes)."""
    rows = []

    def run(adapter, s, seed, lr):
        rows.append(train(adapter, s, seed, lr, spec, backbone, options, workdir))
        if log is not None:
            with open(log, "a") as handle:
                handle.write(json.dumps(rows[-1]) + "\n")
        print(json.dumps(rows[-1]), flush=True)
        return rows[-1]

    for s in shots:
        for adapter in adapters:
            sweep = []
            for lr in sorted(lrs):
                sweep.append(run(adapter, s, seeds[0], lr))
                if len(sweep) > 1 and sweep[-1]["val_accuracy"] < sweep[-2]["val_accuracy"]:
                    break
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
            if not kept:
                cells.append("– | –")
                continue
            accs = [100 * r["test_accuracy"] for r in kept]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1f} ± {spread:.1f} | {kept[0]['lr']:g}")
        params = next(r for r in rows if r["adapter"] == adapter)
        lines.append(f"| {adapter} | {params['trainable']:,} "
                     f"({100 * params['trainable_share']:.1f}%) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_sets(sets: list[str]) -> dict:
    """`hmmoe.scale=4` -> {"hmmoe": {"scale": 4}}; a value is read as JSON, else as text."""
    options: dict = {}
    for item in sets:
        key, _, text = item.partition("=")
        adapter, _, name = key.partition(".")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options.setdefault(adapter, {})[name] = value
    return options


def reused_rows(paths: list[Path], backbone: str, options: dict, trained: set) -> list[dict]:
    """The rows of earlier results files this run can stand on: the same backbone, recipe and
    options for that adapter, for (adapter, shots) pairs not trained now nor taken from an
    earlier file in `paths`."""
    recipe, rows, taken = RECIPES[backbone], [], set(trained)
    for path in paths:
        earlier = json.loads(path.read_text())
        if earlier["backbone"] != backbone or any(
                earlier["recipe"][key] != value for key, value in recipe.items()
                if key != "few_shot_epochs"):
            continue
        pairs = set()
        for row in earlier["rows"]:
            adapter, pair = row["adapter"], (row["adapter"], row["shots"])
            if (pair not in taken and adapter in recipe["few_shot_epochs"]
                    and _epochs(earlier["recipe"], adapter) == recipe["few_shot_epochs"][adapter]
                    and earlier["options"].get(adapter, {}) == options.get(adapter, {})):
                rows.append(row)
                pairs.add(pair)
        taken |= pairs
    return rows


def _epochs(recipe: dict, adapter: str) -> int:
    """An adapter's few-shot epochs in a recipe (one number for all in older files)."""
    epochs = recipe["few_shot_epochs"]
    return epochs[adapter] if isinstance(epochs, dict) else epochs


def add_arguments(parser: argparse.ArgumentParser, backbones: list[str],
                  adapters: tuple[str, ...], shots: str, lrs: str) -> None:
    """The options every learning comparison takes (this one and the vqa one)."""
    parser.add_argument("--backbone", default="real", choices=backbones)
    parser.add_argument("--adapters", default=",".join(adapters))
    parser.add_argument("--shots", default=shots, help="comma-separated; 0 = full")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default=lrs, help="the sweep, on the first seed, ascending")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        metavar="ADAPTER.OPTION=VALUE", help="an option over the defaults")
    parser.add_argument("--tag", help="added to the results' file name")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")


def settings(args: argparse.Namespace, default_options: dict) -> tuple:
    """(adapters, shots, seeds, lrs, options, backbone spec) from `add_arguments`' options;
    the real pair is built (or found) here."""
    options = {**default_options.get(args.backbone, {})}
    for adapter, values in parse_sets(args.sets).items():
        options[adapter] = {**options.get(adapter, {}), **values}
    spec = real_pair().spec if args.backbone == "real" else args.backbone
    return (args.adapters.split(","), [int(s) for s in args.shots.split(",")],
            [int(s) for s in args.seeds.split(",")], [float(lr) for lr in args.lrs.split(",")],
            options, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, sorted(RECIPES), ADAPTERS, shots="4,16", lrs="1e-3,1e-2,1e-1")
    parser.add_argument("--reuse", type=Path, action="append", default=[],
                        help="an earlier results file (see above); repeatable, first wins")
    args = parser.parse_args()
    adapters, shots, seeds, lrs, options, spec = settings(args, OPTIONS)
    with tempfile.TemporaryDirectory(prefix="mmdeploy-learning-") as workdir:
        rows = compare(adapters, shots, seeds, lrs, spec, args.backbone, options,
                       Path(workdir))
    if args.reuse:
        rows += reused_rows(args.reuse, args.backbone, options,
                            {(a, s) for a in adapters for s in shots})
    shown = [a for a in ADAPTERS if any(r["adapter"] == a for r in rows)]
    markdown = table(rows, shown, sorted({r["shots"] for r in rows}, key=lambda s: s or 1e9))
    stem = f"{datetime.date.today().isoformat()}-{platform.node()}-learning-{args.backbone}"
    stem += f"-{args.tag}" if args.tag else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"backbone": args.backbone, "data": "demo", "recipe": RECIPES[args.backbone],
         "options": options, "lrs": lrs, "seeds": seeds,
         "metric": "test accuracy of the best-on-validation checkpoint, mean ± std over "
                   "seeds, at the learning rate chosen on validation (first seed)",
         "rows": rows}, indent=2))
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
