"""The `mmdeploy` command line: parses, calls the library, prints.

Every `MmdeployError` becomes one line on stderr and exit status 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import ConfigError, MmdeployError
from .registry import ADAPTERS
from .runtime import BACKENDS


def _batch_range(text: str) -> tuple[int, int, int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter("expected MIN,OPT,MAX, e.g. 1,8,64") from None
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise click.BadParameter("expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX")
    return values[0], values[1], values[2]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mm-peft-deploy", prog_name="mmdeploy")
def cli() -> None:
    """Train adapters on a frozen vision-language backbone, export verified engines, serve.

    \b
    mmdeploy train  --adapter hmmoe --data demo --backbone tiny --out runs/hmmoe-demo
    mmdeploy train  --adapter ganet --data demo --out runs/ganet-demo --option k=5
    mmdeploy export --adapter hmmoe --run runs/hmmoe-demo --format onnx
    mmdeploy verify runs/hmmoe-demo
    mmdeploy infer  runs/hmmoe-demo images/ -o preds.jsonl
    mmdeploy info   runs/hmmoe-demo
    mmdeploy serve  runs/hmmoe-demo --port 7860
    """


class _TrainCommand(click.Command):
    """`train --help` ends with every adapter's options and defaults (imported only then)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from .config import describe_options
        from .registry import adapter_class

        with formatter.section("Adapter options (--option KEY=VALUE; defaults shown)"):
            formatter.write_dl([
                (name, describe_options(adapter_class(name).config_class).replace(",", ", "))
                for name in sorted(ADAPTERS)])


@cli.command(cls=_TrainCommand)
@click.option("--adapter", type=click.Choice(sorted(ADAPTERS)),
              help="Adapter to train (baselines: linear-probe, lora, zero-shot); required "
                   "unless --resume.")
@click.option("--data", "source", default="demo", show_default=True,
              help="`demo`, an image folder (one subfolder per class) or a CSV/JSONL manifest.")
@click.option("--backbone", default="tiny", show_default=True,
              help="`tiny`, a local CLIP checkpoint directory, or VISION_DIR,TEXT_DIR.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--shots", type=click.IntRange(min=0), default=16, show_default=True,
              help="Training images per class; 0 = the whole training pool.")
@click.option("--val-per-class", type=click.IntRange(min=1), default=20, show_default=True,
              help="Validation images per class (model selection).")
@click.option("--test-per-class", type=click.IntRange(min=1), default=50, show_default=True,
              help="Test images per class (reported once, at the end).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds initialisation and data order.")
@click.option("--split-seed", type=int, default=0, show_default=True,
              help="Seeds the train/val/test split.")
@click.option("--ewc-lambda", type=click.FloatRange(min=0), default=None,
              help="EWC strength (0 = off); default: the adapter's `ewc_lambda` option if it "
                   "has one (ganet: 1.0), else 0.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Adapter option, repeatable (see `mmdeploy options ADAPTER`).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint (other options ignored).")
def train(adapter, source, backbone, out, shots, val_per_class, test_per_class, epochs,
          max_steps, batch_size, lr, seed, split_seed, ewc_lambda, options, overwrite,
          resume) -> None:
    """Train an adapter on the frozen backbone; the best epoch on validation is kept.

    \b
    Example:
      mmdeploy train --adapter hmmoe --data demo --backbone tiny --out runs/hmmoe-demo \\
          --shots 16 --epochs 10 --option rank=8 --option top_k=2
    """
    from .config import BackboneConfig, DataConfig, TrainConfig, parse_overrides
    from .registry import adapter_class
    from .trainers.run import existing_run, new_run, run_training

    if resume:
        prepared = existing_run(out)
    elif adapter is None:
        raise click.UsageError("Missing option '--adapter' (needed unless --resume).")
    else:
        overrides = parse_overrides(adapter_class(adapter).config_class, options)
        prepared = new_run(
            out, adapter, overrides, BackboneConfig(spec=backbone),
            DataConfig(source=source, shots=shots, val_per_class=val_per_class,
                       test_per_class=test_per_class, split_seed=split_seed),
            TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                        seed=seed, ewc_lambda=ewc_lambda), overwrite=overwrite)
    result = run_training(prepared, resume=resume)
    run = prepared.run
    share = result.parameters["trainable_share"]
    click.echo(f"{run.adapter}: best val accuracy {result.best_val_accuracy:.4f} (step "
               f"{result.best_step}), test accuracy {result.test_accuracy:.4f}, "
               f"{result.parameters['trainable']:,} trainable parameters ({share:.2%} of the "
               f"backbone), {result.steps} steps in {result.seconds:.1f} s -> {out}")


@cli.command()
@click.argument("adapter", type=click.Choice(sorted(ADAPTERS)))
def options(adapter) -> None:
    """List an adapter's options and their defaults (set them with `train --option`).

    \b
    Example:
      mmdeploy options hmmoe
    """
    from .config import describe_options
    from .registry import adapter_class

    click.echo(describe_options(adapter_class(adapter).config_class).replace(" ", "\n"))


@cli.command()
@click.option("--run", "run_path", type=click.Path(path_type=Path), required=True,
              help="Run directory made by `mmdeploy train`.")
@click.option("--adapter", type=click.Choice(sorted(ADAPTERS)), default=None,
              help="Expected adapter of the run (checked).")
@click.option("--format", "formats", default="onnx", show_default=True,
              help="Comma-separated: onnx, aoti (AOTInductor .pt2), tensorrt (needs a GPU and "
                   "the [trt] extra; builds from the ONNX, which it exports too if missing), "
                   "triton (a Triton model repository of the verified ONNX and TensorRT files; "
                   "the [triton] extra).")
@click.option("--batch-range", default="1,8,32", show_default=True,
              help="MIN,OPT,MAX batch of the dynamic axis (TensorRT's profile); parity runs "
                   "at MIN, an odd batch and MAX.")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="`tensorrt` turns the op lint's findings into errors.")
@click.option("--fp16", is_flag=True,
              help="Build FP16 where the format has an FP16 path (tensorrt; aoti on CUDA); "
                   "the ONNX graph stays FP32. Parity: cosine >= 0.999, top-1 >= 99.5%.")
@click.option("--out", "triton_out", type=click.Path(path_type=Path), default=None,
              help="With --format triton: the model repository's folder (default RUN/triton).")
def export(run_path, adapter, formats, batch_range, target, fp16, triton_out) -> None:
    """Merge, freeze and compile a run; publish only what passes parity.

    \b
    Examples:
      mmdeploy export --adapter hmmoe --run runs/hmmoe-demo --format onnx --batch-range 1,8,32
      mmdeploy export --run runs/hmmoe-demo --format onnx,aoti
      mmdeploy export --run runs/hmmoe-demo --format tensorrt --fp16   # on a GPU machine
      mmdeploy export --run runs/hmmoe-demo --format triton --out model_repository
    """
    from .artifacts import RunDir
    from .config import ExportConfig
    from .exporters.export import export_run
    from .exporters.triton import model_config_pb2, split_formats, write_repository
    from .runs import load_run_config

    run = load_run_config(RunDir(run_path))
    if adapter is not None and adapter != run.adapter:
        raise ConfigError(f"{run_path} holds a {run.adapter!r} adapter, not {adapter!r}")
    low, opt, high = _batch_range(batch_range)
    wanted, triton = split_formats(tuple(f.strip() for f in formats.split(",")), run_path)
    if triton:
        model_config_pb2()  # say which extra is missing before exporting anything
    if wanted:
        config = ExportConfig(formats=wanted, batch_min=low, batch_opt=opt, batch_max=high,
                              target=target, fp16=fp16)
        manifest = export_run(run_path, config.formats, config, log=click.echo)
        click.echo(f"exported {', '.join(sorted(manifest.files))} -> "
                   f"{RunDir(run_path).export_dir}")
    if triton:
        repository = write_repository(run_path, triton_out, log=click.echo)
        click.echo(f"Triton model repository (validated) -> {repository}")


@cli.command()
@click.argument("run_path", type=click.Path(path_type=Path))
def verify(run_path) -> None:
    """Re-check every exported backend: file hashes, then parity against PyTorch on fresh
    random inputs and real images. Exit status 1 if any fails.

    \b
    Example:
      mmdeploy verify runs/hmmoe-demo
    """
    from .exporters.verify import verify_run

    reports = verify_run(run_path, log=click.echo)
    failed = [r.backend for r in reports if not r.passed]
    if failed:
        click.echo(f"error: parity failed for {', '.join(failed)}", err=True)
        sys.exit(1)
    click.echo(f"all {len(reports)} exported backend(s) pass parity")


@cli.command()
@click.argument("run_path", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Rows out: .jsonl or .csv.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Default: the fastest one present, and it says why.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Threads that decode and preprocess images while the model runs; 0 = "
                   "decode on the main thread. Default: min(4, CPU cores).")
@click.option("--resume", is_flag=True, help="Keep rows already in OUTPUT; skip those inputs.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--fail-fast", is_flag=True,
              help="Stop at the first bad input with an error (exit 1) instead of writing an "
                   "error row; the rows before it are kept.")
def infer(run_path, inputs, output, backend, batch_size, top_k, workers, resume, overwrite,
          fail_fast) -> None:
    """Batch inference over folders, globs or manifests; one row per file, written in input
    order as it goes, with a progress bar and a summary at the end.

    \b
    Example:
      mmdeploy infer runs/hmmoe-demo photos/ 'more/*.jpg' list.csv -o preds.jsonl
      mmdeploy infer runs/hmmoe-demo photos/ -o preds.jsonl --resume   # after a kill
    """
    import itertools

    from .data import list_inputs
    from .inference import DEFAULT_WORKERS, InferenceOptions, run_inference
    from .runtime import load_predictor, pick_backend

    if output.suffix.lower() not in (".jsonl", ".csv"):
        raise ConfigError(f"{output}: output must end in .jsonl or .csv")
    if not output.parent.is_dir():
        raise ConfigError(f"{output}: folder {output.parent} does not exist")
    if output.exists() and not (resume or overwrite):
        raise ConfigError(f"{output} already exists; pass --overwrite or --resume")
    listed = itertools.chain.from_iterable([list_inputs(spec) for spec in inputs])
    chosen, skipped = pick_backend(run_path, backend)
    for reason in skipped:
        click.echo(f"not using {reason}", err=True)
    predictor = load_predictor(run_path, chosen)
    click.echo(f"backend: {predictor.describe()}", err=True)
    options = InferenceOptions(batch_size=batch_size, top_k=top_k, resume=resume,
                               fail_fast=fail_fast,
                               workers=DEFAULT_WORKERS if workers is None else workers)
    summary = run_inference(predictor, listed, output, options)
    count = summary.duplicates
    duplicates = f", {count} duplicate{'s' * (count != 1)} skipped" if count else ""
    click.echo(f"{summary.written} rows written ({summary.errors} errors, {summary.resumed} "
               f"already done{duplicates}) in {summary.seconds:.1f} s "
               f"({summary.images_per_second:.1f} images/s) -> {output}")


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter("expected comma-separated batch sizes, e.g. 1,8,32") from None
    if min(values) < 1:
        raise click.BadParameter("batch sizes must be at least 1")
    return values


@cli.command()
@click.argument("run_path", type=click.Path(path_type=Path))
@click.option("--batch", "batches", default="1,8,32", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--backends", default=None,
              help="Comma-separated subset of eager, compile, eager-fp16, onnxruntime, aoti, "
                   "tensorrt (default: every one available; eager always runs).")
@click.option("--backbone", type=click.Choice(["run", "vit-b16"]), default="run",
              show_default=True,
              help="`vit-b16`: build (or reuse) RUN as a one-step run on a random ViT-B/16-sized "
                   "CLIP, exported to ONNX and AOTInductor, and bench that.")
@click.option("--adapter", type=click.Choice(sorted(ADAPTERS)), default="hmmoe",
              show_default=True, help="Adapter of the --backbone vit-b16 run.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Results file (default: benchmarks/results/<date>-<host>-<backbone>.json).")
def bench(run_path, batches, backends, backbone, adapter, warmup, iters, out) -> None:
    """Time every available backend against PyTorch eager in one process: median and p90
    latency, images/s, peak memory, ratio to eager, and the frozen backbone alone beside
    the adapted model.

    \b
    Examples:
      mmdeploy bench runs/hmmoe-demo --batch 1,8,32
      mmdeploy bench runs/bench-vitb16 --backbone vit-b16 --batch 1,8,32 --iters 10
    """
    from rich.console import Console

    from .bench import bench_run, default_results_path, render_table, write_result

    sizes = _batches(batches)
    label = None
    if backbone == "vit-b16":
        from .vit_b16 import LABEL, prepare_run

        prepare_run(run_path, adapter, sizes, log=click.echo)
        label = LABEL
    wanted = [b.strip() for b in backends.split(",")] if backends else None
    result = bench_run(run_path, sizes, wanted, warmup, iters, label, log=click.echo)
    for backend, reason in result.skipped.items():
        click.echo(f"not benched: {backend}: {reason}", err=True)
    # A pipe or a log has no width of its own: wide enough that rows stay on one line.
    Console(width=None if sys.stdout.isatty() else 160).print(render_table(result))
    path = out or default_results_path(label or Path(result.backbone).name)
    write_result(result, path)
    click.echo(f"-> {path}")


@cli.command()
@click.argument("run_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(run_path, as_json) -> None:
    """What is in a run: adapter, classes, parameters, exported files, parity.

    \b
    Example:
      mmdeploy info runs/hmmoe-demo --json
    """
    from .info import describe_run

    details = describe_run(run_path)
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    for key, value in details.items():
        click.echo(f"{key}: {value if not isinstance(value, dict | list) else json.dumps(value)}")


@cli.command()
@click.argument("run_path", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Default: the fastest one present, and it says why.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the app to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True,
              help="0 = any free port (the URL printed says which).")
@click.option("--concurrency", type=click.IntRange(min=1), default=2, show_default=True,
              help="Requests predicted at once; others wait in the queue.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests that may wait; more are refused.")
@click.option("--max-images", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per request.")
@click.option("--max-file-mb", type=click.IntRange(min=1), default=16, show_default=True,
              help="Size of one uploaded file, in MiB.")
def serve(run_path, backend, host, port, concurrency, max_queue, max_images,
          max_file_mb) -> None:
    """Serve a run in a Gradio app (upload images, top-k classes, backend and latency) with
    GET /health; stops cleanly on Ctrl+C or SIGTERM.

    \b
    Example:
      mmdeploy serve runs/hmmoe-demo --port 7860
    """
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # the `ui` extra
        raise ConfigError("serve needs gradio: pip install 'mm-peft-deploy[ui]'")
    from .apps import server
    from .apps.service import Classifier, ServeLimits

    listener = server.bind(host, port)  # a busy port fails before the model loads
    limits = ServeLimits(max_images=max_images, max_file_bytes=max_file_mb * 2**20)
    classifier = Classifier(run_path, backend, limits)
    for reason in classifier.skipped:
        click.echo(f"not using {reason}", err=True)
    config = server.ServeConfig(host=host, port=port, concurrency=concurrency,
                                max_queue=max_queue, limits=limits)
    server.serve(classifier, config, listener, on_ready=lambda url: click.echo(
        f"serving {run_path} ({classifier.details['adapter']}, {classifier.backend}) at {url}"
        " (Ctrl+C to stop)"))
    click.echo("stopped")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MmdeployError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
