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
from .registry import ADAPTERS, ALL_ADAPTERS, VQA_ADAPTERS
from .runtime import BACKENDS
from .runtime.records import SERVING_PRECISIONS

_PRECISION_HELP = ("`int8`: the run's model.int8.onnx on onnxruntime (made by `export --int8`, "
                   "served only if it passed its accuracy gate). Default: int8 if the export "
                   "said --serve-int8, else fp32.")


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
        with formatter.section("VQA-only adapters (--data easy-vqa or a question manifest)"):
            formatter.write_dl([
                (name, describe_options(adapter_class(name, "vqa").config_class)
                 .replace(",", ", ") or "(no options)")
                for name in sorted(set(VQA_ADAPTERS) - set(ADAPTERS))])


@cli.command(cls=_TrainCommand)
@click.option("--adapter", type=click.Choice(ALL_ADAPTERS),
              help="Adapter to train (baselines: linear-probe, lora, zero-shot; for vqa also "
                   "question-only, image-only, late-fusion, late-fusion-mlp, product-fusion); "
                   "required unless --resume.")
@click.option("--data", "source", default="demo", show_default=True,
              help="`demo`, an image folder (one subfolder per class) or a CSV/JSONL manifest "
                   "(`path,label`); for image + question -> answer: `easy-vqa` (the [vqa] "
                   "extra) or a `path,question,answer` manifest.")
@click.option("--backbone", default="tiny", show_default=True,
              help="`tiny`, a local CLIP checkpoint directory, or VISION_DIR,TEXT_DIR.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--shots", type=click.IntRange(min=0), default=16, show_default=True,
              help="Training images per class (vqa: questions per answer); 0 = the whole "
                   "training pool.")
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
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Run the whole frozen tower at every step instead of once per image "
                   "(slower; the same weights to float error).")
@click.option("--feature-store", type=click.Path(file_okay=False), default=None,
              help="Keep the frozen tower's features of each split in this folder and reuse "
                   "them in later runs on the same images and backbone (comparisons: "
                   "several seeds or adapters).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint (other options ignored).")
def train(adapter, source, backbone, out, shots, val_per_class, test_per_class, epochs,
          max_steps, batch_size, lr, seed, split_seed, ewc_lambda, options, no_cache,
          feature_store, overwrite, resume) -> None:
    """Train an adapter on the frozen backbone; the best epoch on validation is kept.

    \b
    Example:
      mmdeploy train --adapter hmmoe --data demo --backbone tiny --out runs/hmmoe-demo \\
          --shots 16 --epochs 10 --option rank=8 --option top_k=2
    """
    from .config import BackboneConfig, DataConfig, TrainConfig, parse_overrides
    from .data import data_task
    from .registry import adapter_class
    from .trainers.run import existing_run, new_run, run_training

    if resume:
        prepared = existing_run(out)
    elif adapter is None:
        raise click.UsageError("Missing option '--adapter' (needed unless --resume).")
    else:
        model_class = adapter_class(adapter, data_task(source))
        overrides = parse_overrides(model_class.config_class, options)
        prepared = new_run(
            out, adapter, overrides, BackboneConfig(spec=backbone),
            DataConfig(source=source, shots=shots, val_per_class=val_per_class,
                       test_per_class=test_per_class, split_seed=split_seed),
            TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                        seed=seed, ewc_lambda=ewc_lambda, cache_features=not no_cache,
                        feature_store=feature_store),
            overwrite=overwrite)
        for note in prepared.notes:
            click.echo(f"note: adapter {adapter!r}: {note}", err=True)
    result = run_training(prepared, resume=resume)
    run = prepared.run
    share = result.parameters["trainable_share"]
    click.echo(f"{run.adapter}: best val accuracy {result.best_val_accuracy:.4f} (step "
               f"{result.best_step}), test accuracy {result.test_accuracy:.4f}, "
               f"{result.parameters['trainable']:,} trainable parameters ({share:.2%} of the "
               f"backbone), {result.steps} steps in {result.seconds:.1f} s ("
               + ", ".join(f"{phase} {seconds:.1f} s"
                           for phase, seconds in result.phase_seconds.items())
               + f") -> {out}")


@cli.command()
@click.argument("adapter", type=click.Choice(ALL_ADAPTERS))
def options(adapter) -> None:
    """List an adapter's options and their defaults (set them with `train --option`).

    \b
    Example:
      mmdeploy options hmmoe
    """
    from .config import describe_options
    from .registry import adapter_class

    task = "classification" if adapter in ADAPTERS else "vqa"
    click.echo(describe_options(adapter_class(adapter, task).config_class).replace(" ", "\n"))


@cli.command()
@click.option("--run", "run_path", type=click.Path(path_type=Path), default=None,
              help="Run directory made by `mmdeploy train`.")
@click.option("--shared", is_flag=True,
              help="Export the runs given as arguments (two or more, one backbone) as one "
                   "frozen trunk and a branch per run, into --out; each run is verified "
                   "through the trunk. FP32, --format onnx and/or aoti.")
@click.argument("shared_runs", nargs=-1, type=click.Path(path_type=Path), metavar="[RUNS]...")
@click.option("--adapter", type=click.Choice(sorted(ADAPTERS)), default=None,
              help="Expected adapter of the run (checked).")
@click.option("--format", "formats", default="onnx", show_default=True,
              help="Comma-separated: onnx, aoti (AOTInductor .pt2), tensorrt (needs a GPU and "
                   "the [trt] extra; builds from the ONNX, which it exports too if missing), "
                   "triton (a Triton model repository of the verified ONNX and TensorRT files; "
                   "the [triton] extra), auto (every format this machine can build, each "
                   "then timed at the OPT batch: infer and serve use the fastest).")
@click.option("--batch-range", default="1,8,32", show_default=True,
              help="MIN,OPT,MAX batch of the dynamic axis (TensorRT's profile); parity runs "
                   "at MIN, an odd batch and MAX.")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="`tensorrt` turns the op lint's findings into errors.")
@click.option("--fp16", is_flag=True,
              help="Build FP16 where the format has an FP16 path (tensorrt; aoti on CUDA); "
                   "the ONNX graph stays FP32. Parity: cosine >= 0.999, top-1 >= 99.5%.")
@click.option("--out", "triton_out", type=click.Path(path_type=Path), default=None,
              help="With --format triton: the model repository's folder (default "
                   "RUN/triton). With --shared: the folder of the trunk and branches.")
@click.option("--int8", type=click.Choice(["dynamic", "static"]), default=None, is_flag=False,
              flag_value="dynamic",
              help="Also quantize model.onnx to model.int8.onnx (ONNX Runtime), published only "
                   "if it passes the accuracy gate; `--int8` alone is dynamic. Without "
                   "--format, the run's verified model.onnx is quantized (exported if missing).")
@click.option("--calib", type=click.IntRange(min=0), default=64, show_default=True,
              help="--int8 static: training images to calibrate on (all if the split has fewer).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]),
              default="minmax", show_default=True, help="--int8 static: how ranges are set.")
@click.option("--calib-seed", type=int, default=0, show_default=True,
              help="--int8: seed of the draw of calibration (and smoothing) images.")
@click.option("--int8-weights", type=click.Choice(["per-tensor", "per-channel"]), default=None,
              help="--int8: one weight scale per tensor or per output channel (default: "
                   "per-channel for static, per-tensor for dynamic).")
@click.option("--smooth", type=click.FloatRange(0, 1), default=None, metavar="ALPHA",
              help="--int8: SmoothQuant-style smoothing with migration strength ALPHA (0.5 "
                   "is the paper's), measured on --calib training images; exact in FP32.")
@click.option("--int8-symmetric", is_flag=True,
              help="--int8 static: signed INT8 activations, zero points 0: the QDQ graph "
                   "TensorRT reads (slower than the default on ONNX Runtime's CPU kernels).")
@click.option("--fallback-order", type=click.Choice(["structural", "measured"]),
              default="structural", show_default=True,
              help="--int8: which MatMuls the gate's fallback moves back to FP32 first: the "
                   "adapter's, the first and last blocks, then by measured sensitivity; or by "
                   "measured sensitivity only.")
@click.option("--gate-agreement", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="INT8 gate: least top-1 agreement with the FP32 model.")
@click.option("--gate-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="INT8 gate: most validation accuracy lost, in points.")
@click.option("--serve-int8", is_flag=True,
              help="With --int8: infer and serve use the INT8 graph unless --precision fp32.")
def export(run_path, shared, shared_runs, adapter, formats, batch_range, target, fp16,
           triton_out, int8, calib, calib_method, calib_seed, int8_weights, smooth,
           int8_symmetric, fallback_order, gate_agreement, gate_drop, serve_int8) -> None:
    """Merge, freeze and compile a run; publish only what passes parity.

    \b
    Examples:
      mmdeploy export --adapter hmmoe --run runs/hmmoe-demo --format onnx --batch-range 1,8,32
      mmdeploy export --run runs/hmmoe-demo --format onnx,aoti
      mmdeploy export --run runs/hmmoe-demo --format auto   # all that builds here, timed
      mmdeploy export --run runs/hmmoe-demo --format tensorrt --fp16   # on a GPU machine
      mmdeploy export --run runs/hmmoe-demo --format triton --out model_repository
      mmdeploy export --run runs/hmmoe-demo --int8 static --calib 64   # INT8, gated
      mmdeploy export --run runs/hmmoe-demo --int8 dynamic --int8-weights per-channel --smooth 0.5
      mmdeploy export --shared runs/hmmoe-demo runs/ganet-demo --out shared/   # one trunk
    """
    from .artifacts import RunDir
    from .config import ExportConfig
    from .exporters.export import export_run
    from .exporters.formats import AUTO
    from .runs import load_run_config
    from .runtime import default_precision, pick_backend

    if shared:
        _export_shared(run_path, shared_runs, adapter, formats, batch_range, target,
                       triton_out, fp16, int8)
        return
    if run_path is None or shared_runs:
        raise ConfigError("export takes --run RUN, or --shared RUN1 RUN2 ... --out DIR")
    run = load_run_config(RunDir(run_path))
    if adapter is not None and adapter != run.adapter:
        raise ConfigError(f"{run_path} holds a {run.adapter!r} adapter, not {adapter!r}")
    low, opt, high = _batch_range(batch_range)
    requested = tuple(f.strip() for f in formats.split(","))
    if int8 and click.get_current_context().get_parameter_source(
            "formats") is click.core.ParameterSource.DEFAULT:
        requested = ()  # quantize the run's verified model.onnx
    config = ExportConfig(formats=requested, batch_min=low, batch_opt=opt, batch_max=high,
                          target=target, fp16=fp16, int8=int8, calib=calib,
                          calib_method=calib_method, calib_seed=calib_seed,
                          int8_per_channel=None if int8_weights is None
                          else int8_weights == "per-channel", smooth=smooth,
                          int8_symmetric=int8_symmetric, fallback_order=fallback_order,
                          gate_agreement=gate_agreement,
                          gate_drop=gate_drop, serve_int8=serve_int8,
                          triton_out=None if triton_out is None else str(triton_out))
    manifest = export_run(run_path, config, log=click.echo)
    click.echo(f"exported {', '.join(sorted(manifest.files))} -> {RunDir(run_path).export_dir}")
    if "triton" in requested:
        repository = manifest.exports["triton"].details["repository"]
        click.echo(f"Triton model repository (validated) -> {repository}")
    if AUTO in requested:
        chosen, _ = pick_backend(run_path, precision=default_precision(run_path))
        click.echo(f"infer and serve will use {chosen} (`mmdeploy infer` says why)")


def _export_shared(run_path, runs, adapter, formats, batch_range, target, out, fp16,
                   int8) -> None:
    """`export --shared`: the options that mean something for a trunk and its branches;
    the others (--int8, --fp16, a format other than onnx and aoti) are refused by the
    exporter."""
    from .config import ExportConfig
    from .exporters.shared import export_shared

    if run_path is not None or adapter is not None:
        raise ConfigError("--shared takes its runs as arguments, not --run or --adapter")
    if out is None:
        raise ConfigError("--shared needs --out DIR, the folder of the trunk and branches")
    low, opt, high = _batch_range(batch_range)
    config = ExportConfig(formats=tuple(f.strip() for f in formats.split(",")), batch_min=low,
                          batch_opt=opt, batch_max=high, target=target, fp16=fp16, int8=int8)
    manifest = export_shared(list(runs), out, config, log=click.echo)
    click.echo(f"exported {', '.join(sorted(manifest.files))} -> {out}")


@cli.command()
@click.argument("run_path", type=click.Path(path_type=Path))
def verify(run_path) -> None:
    """Re-check every exported backend: file hashes, then parity against PyTorch on fresh
    random inputs and real images (INT8 graphs: their accuracy gate). Exit status 1 if any
    fails.

    \b
    Example:
      mmdeploy verify runs/hmmoe-demo
    """
    from .exporters.verify import verify_run

    reports = verify_run(run_path, log=click.echo)
    check = "parity or their accuracy gate" if any(r.kind == "gate" for r in reports) else "parity"
    failed = [r.backend for r in reports if not r.passed]
    if failed:
        click.echo(f"error: {check} failed for {', '.join(failed)}", err=True)
        sys.exit(1)
    click.echo(f"all {len(reports)} exported backend(s) pass {check}")


@cli.command()
@click.argument("run_path", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Rows out: .jsonl or .csv (or .parquet with --engine ray).")
@click.option("--shared", "shared_dir", type=click.Path(path_type=Path), default=None,
              help="A shared export (`export --shared RUN1 RUN2 ... --out DIR`): every "
                   "argument is an input, and each input gets a row per run.")
@click.option("--runs", "shared_runs", default=None,
              help="With --shared: the runs to infer with, comma-separated names of DIR's "
                   "branches. Default: all of them.")
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
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="`ray`: a Ray Data pipeline (decode tasks, a pool of predictor actors), rows "
                   "in the order they finish; needs the [ray] extra.")
@click.option("--ray-address", default=None,
              help="With --engine ray: join this Ray cluster. Default: $RAY_ADDRESS, else a "
                   "local Ray started for the run and stopped after it.")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --engine ray: predictor actors. Default: one per GPU on a GPU "
                   "backend, else one per node.")
@click.option("--precision", type=click.Choice(SERVING_PRECISIONS), default=None,
              help=_PRECISION_HELP)
@click.option("--question", default=None, metavar="TEXT",
              help="A vqa run: ask every image this question (folders, globs, files, and "
                   "manifests without a `question` column; a manifest's column asks each "
                   "line its own).")
def infer(run_path, inputs, output, shared_dir, shared_runs, backend, batch_size, top_k,
          workers, resume, overwrite, fail_fast, engine, ray_address, actors,
          precision, question) -> None:
    """Batch inference over folders, globs or manifests; one row per file, written as it
    goes (in input order; with --engine ray in the order batches finish, keyed by path),
    with a progress bar and a summary at the end.

    \b
    Example:
      mmdeploy infer runs/hmmoe-demo photos/ 'more/*.jpg' list.csv -o preds.jsonl
      mmdeploy infer runs/hmmoe-demo photos/ -o preds.jsonl --resume   # after a kill
      mmdeploy infer runs/hmmoe-demo photos/ -o preds.parquet --engine ray --actors 2
      mmdeploy infer --shared shared/ photos/ -o preds.jsonl   # a row per image and run
      mmdeploy infer runs/vqa questions.csv -o answers.jsonl   # path,question columns
      mmdeploy infer runs/vqa photos/ --question "what color is the shape?" -o answers.jsonl

    With --shared DIR, the runs come from their shared export, not from RUN arguments: DIR
    is where the trunk and branches are, verified together and named in its manifest
    (a run folder does not say which shared export it is in), and every argument is then an
    input. Each image is decoded once and goes through the trunk once, then each run's
    branch; an image that cannot be read gets an error row for each run.
    """
    import itertools

    from .inference.batch import DEFAULT_WORKERS, InferenceOptions, run_inference
    from .inference.inputs import list_inputs
    from .runtime import default_precision, load_predictor, pick_backend

    task = "classification"
    if shared_dir is not None:
        inputs = (str(run_path), *inputs)
        if engine == "ray" or precision == "int8" or question is not None:
            raise ConfigError("--shared serves FP32 trunk and branches of classification "
                              "runs with --engine local")
    elif shared_runs is not None:
        raise ConfigError("--runs needs --shared DIR")
    elif not inputs:
        raise ConfigError("infer takes RUN INPUTS..., or --shared DIR INPUTS...")
    else:
        precision = precision or default_precision(run_path)
        task = _run_task(run_path)
    if question is not None and task == "vqa":  # a classification run refuses it as input
        from .questions import check_question

        question = check_question(question)
    if engine == "ray":
        from .inference.ray_cluster import require_ray

        require_ray("infer --engine ray", "ray.data")
        if workers is not None:
            raise ConfigError("--workers is for --engine local; with --engine ray, Ray tasks "
                              "decode and --actors sizes the predictor pool")
    elif actors is not None or ray_address is not None:
        raise ConfigError("--actors and --ray-address need --engine ray")
    elif output.suffix.lower() not in (".jsonl", ".csv"):
        raise ConfigError(f"{output}: output must end in .jsonl or .csv")
    if not output.parent.is_dir():
        raise ConfigError(f"{output}: folder {output.parent} does not exist")
    if output.exists() and not (resume or overwrite):
        raise ConfigError(f"{output} already exists; pass --overwrite or --resume")
    listed = itertools.chain.from_iterable([list_inputs(spec, task, question)
                                            for spec in inputs])
    options = InferenceOptions(batch_size=batch_size, top_k=top_k, resume=resume,
                               fail_fast=fail_fast,
                               workers=DEFAULT_WORKERS if workers is None else workers)
    if shared_dir is not None:
        summary = _infer_shared(shared_dir, shared_runs, backend, listed, output, options)
        _echo_summary(summary, output, "rows")
        return
    chosen, skipped = pick_backend(run_path, backend, precision)
    for reason in skipped:
        click.echo(f"not using {reason}", err=True)
    if engine == "ray":
        from .inference.ray_engine import RayInferenceOptions, infer_on_ray

        ray_options = RayInferenceOptions(batch_size=batch_size, top_k=top_k, actors=actors,
                                          resume=resume, fail_fast=fail_fast)
        summary = infer_on_ray(run_path, chosen, listed, output, ray_options, ray_address,
                               log=lambda line: click.echo(line, err=True),
                               precision=precision)
    else:
        predictor = load_predictor(run_path, chosen, precision)
        click.echo(f"backend: {predictor.describe()}, precision {predictor.precision}",
                   err=True)
        summary = run_inference(predictor, listed, output, options)
    _echo_summary(summary, output, "images")


def _run_task(run_path: Path) -> str:
    """The run's task (`classification` or `vqa`), read from its config."""
    from .artifacts import RunDir
    from .runs import load_run_config

    return load_run_config(RunDir(run_path)).task


def _infer_shared(shared_dir, runs, backend, listed, output, options):
    """`infer --shared DIR`: a row per input and run, through one trunk."""
    from .inference.shared import run_shared_inference
    from .runtime.shared import SharedPredictor

    names = None if runs is None else [name.strip() for name in runs.split(",")]
    predictor = SharedPredictor(shared_dir, backend, names)
    click.echo(f"backend: {predictor.describe()}; runs: {', '.join(predictor.runs)}", err=True)
    return run_shared_inference(predictor, listed, output, options)


def _echo_summary(summary, output: Path, unit: str) -> None:
    count = summary.duplicates
    duplicates = f", {count} duplicate{'s' * (count != 1)} skipped" if count else ""
    click.echo(f"{summary.written} rows written ({summary.errors} errors, {summary.resumed} "
               f"already done{duplicates}) in {summary.seconds:.1f} s "
               f"({summary.images_per_second:.1f} {unit}/s) -> {output}")


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
              help="Comma-separated subset of eager, compile, eager-fp16, onnxruntime, "
                   "onnxruntime-int8, aoti, tensorrt (default: every one available; eager "
                   "always runs; onnxruntime-int8 runs the run's gated model.int8.onnx).")
@click.option("--backbone", type=click.Choice(["run", "vit-b16"]), default="run",
              show_default=True,
              help="`vit-b16`: build (or reuse) RUN as a one-step run on a random ViT-B/16-sized "
                   "CLIP, exported to ONNX, AOTInductor and dynamic INT8, and bench that.")
@click.option("--adapter", type=click.Choice(sorted(ADAPTERS)), default="hmmoe",
              show_default=True, help="Adapter of the --backbone vit-b16 run.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--peak-size", type=click.IntRange(min=0), default=2048, show_default=True,
              help="Square matmul on which this machine's ONNX Runtime FP32/INT8 peak is "
                   "measured (0 skips it).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Results file (default: benchmarks/results/<date>-<host>-<backbone>.json).")
@click.option("--record", is_flag=True,
              help="Also keep each export backend's timing (at its export's OPT batch, or the "
                   "nearest benched) in the run's export records: infer and serve then use "
                   "the fastest on this machine (`export --format auto` records them too).")
def bench(run_path, batches, backends, backbone, adapter, warmup, iters, peak_size,
          out, record) -> None:
    """Time every available backend against PyTorch eager in one process: median and p90
    latency, images/s, peak memory, ratio to eager, and the frozen backbone alone beside
    the adapted model; each backend's achieved GFLOP/s as a share of this machine's ONNX
    Runtime FP32/INT8 matmul peak, measured in the same run; and for the INT8 row, the
    accuracy gate's figures.

    \b
    Examples:
      mmdeploy bench runs/hmmoe-demo --batch 1,8,32
      mmdeploy bench runs/bench-vitb16 --backbone vit-b16 --batch 1,8,32 --iters 10
      mmdeploy bench runs/hmmoe-demo --batch 8 --record   # infer and serve pick by it
    """
    from rich.console import Console

    from .bench.backends import (
        bench_run,
        default_results_path,
        record_timings,
        render_table,
        write_result,
    )

    sizes = _batches(batches)
    label = None
    if backbone == "vit-b16":
        from .bench.vit_b16 import LABEL, prepare_run

        prepare_run(run_path, adapter, sizes, log=click.echo)
        label = LABEL
    wanted = [b.strip() for b in backends.split(",")] if backends else None
    result = bench_run(run_path, sizes, wanted, warmup, iters, label, log=click.echo,
                       peak_size=peak_size)
    for backend, reason in result.skipped.items():
        click.echo(f"not benched: {backend}: {reason}", err=True)
    # A pipe or a log has no width of its own: wide enough that rows stay on one line.
    Console(width=None if sys.stdout.isatty() else 160).print(render_table(result))
    path = out or default_results_path(label or Path(result.backbone).name)
    write_result(result, path)
    click.echo(f"-> {path}")
    if record:
        lines = record_timings(run_path, result)
        for line in lines or ["--record: no export backend was benched; nothing recorded"]:
            click.echo(line)


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
@click.argument("run_paths", nargs=-1, type=click.Path(path_type=Path), metavar="RUN")
@click.option("--shared", "shared_dir", type=click.Path(path_type=Path), default=None,
              help="Serve the runs of a shared export (`export --shared RUN1 RUN2 ... --out "
                   "DIR`) through its one trunk; a request names its adapter. No RUN then.")
@click.option("--runs", "shared_runs", default=None,
              help="With --shared: the runs to serve at start, comma-separated names of DIR's "
                   "branches (the first is the default). Default: all of them.")
@click.option("--allow-add", is_flag=True,
              help="With --shared: let clients add a run on this machine to the live server "
                   "(POST /adapters {\"run\": PATH}); its branch is exported into DIR "
                   "against the trunk and verified through it first.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Default: the fastest one present, and it says why.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the app to the network. With "
                   "--engine ray only Serve's HTTP port follows it: Ray's own ports listen on "
                   "every interface.")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True,
              help="0 = any free port (the URL printed says which).")
@click.option("--concurrency", type=click.IntRange(min=1), default=2, show_default=True,
              help="Requests predicted at once (--engine ray: per replica, batched together); "
                   "others wait in the queue.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests that may wait; more are refused (--engine ray: per proxy, 503).")
@click.option("--max-images", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per request.")
@click.option("--max-file-mb", type=click.IntRange(min=1), default=16, show_default=True,
              help="Size of one uploaded file, in MiB.")
@click.option("--precision", type=click.Choice(SERVING_PRECISIONS), default=None,
              help=_PRECISION_HELP)
@click.option("--engine", type=click.Choice(["gradio", "ray"]), default="gradio",
              show_default=True,
              help="`ray`: Ray Serve replicas behind an HTTP API (POST /predict, GET /health, "
                   "GET /info) with request batching; needs the [ray] extra.")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="With --engine ray: replicas, each with its own predictor (default 1).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=None,
              help="With --engine ray: how long a replica waits for more requests to predict "
                   "in one batch (default 10). With --shared: how long a request waits for "
                   "others to share its trunk pass (default 2).")
@click.option("--ray-address", default=None,
              help="With --engine ray: join this Ray cluster. Default: $RAY_ADDRESS, else a "
                   "local Ray started for the app and stopped with it.")
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On Ctrl+C or SIGTERM, how long requests in flight may take to finish "
                   "before they are cancelled.")
@click.option("--show-paths", is_flag=True,
              help="Show clients the run's and the backbone's server paths (in /health, "
                   "/info and the Run tab); by default only their folder names.")
def serve(run_paths, shared_dir, shared_runs, allow_add, backend, host, port, concurrency,
          max_queue, max_images, max_file_mb, precision, engine, replicas, batch_wait_ms,
          ray_address, grace_seconds, show_paths) -> None:
    """Serve a run in a Gradio app (upload images, top-k classes, backend and latency) with
    GET /health, or with --engine ray as an HTTP API on Ray Serve; stops cleanly on Ctrl+C
    or SIGTERM.

    \b
    Examples:
      mmdeploy serve runs/hmmoe-demo --port 7860
      mmdeploy serve runs/hmmoe-demo --engine ray --replicas 2 --port 8000
      curl -F files=@cat.jpg -F files=@dog.png http://127.0.0.1:8000/predict
      mmdeploy serve --shared shared/ --allow-add   # many adapters, one trunk
      curl -F files=@cat.jpg -F adapter=ganet-demo http://127.0.0.1:7860/predict

    Several runs on one backbone are served through one trunk: export them together
    (`mmdeploy export --shared RUN1 RUN2 ... --out DIR`), then `serve --shared DIR`.
    """
    import importlib.util

    if shared_dir is not None:
        if run_paths or precision == "int8":
            raise ConfigError("serve --shared DIR takes no RUN and serves FP32 trunk and "
                              "branches")
        if engine == "ray" and allow_add:
            raise ConfigError("--allow-add is for --engine gradio: on --engine ray the "
                              "adapters are fixed at start (each replica holds its own)")
    elif shared_runs is not None or allow_add:
        raise ConfigError("--runs and --allow-add need --shared DIR")
    elif len(run_paths) != 1:
        raise ConfigError("serve takes one RUN; to serve several runs of one backbone, export "
                          "them as one trunk (`mmdeploy export --shared RUN1 RUN2 ... --out "
                          "DIR`) and serve --shared DIR")
    run_path = run_paths[0] if run_paths else None

    if engine == "ray":
        from .inference.ray_cluster import require_ray
        from .runtime import default_precision

        require_ray("serve --engine ray", "ray.serve", "python_multipart")
        from .apps.ray_serve import RayServeConfig, serve_on_ray
        from .apps.service import ServeLimits

        config = RayServeConfig(
            host=host, port=port, replicas=replicas or 1, concurrency=concurrency,
            max_queue=max_queue, batch_wait_ms=10.0 if batch_wait_ms is None else batch_wait_ms,
            limits=ServeLimits(max_images=max_images, max_file_bytes=max_file_mb * 2**20),
            precision=precision or ("fp32" if shared_dir else default_precision(run_path)),
            address=ray_address, graceful_seconds=grace_seconds, show_paths=show_paths)
        if shared_dir is not None:
            _serve_shared_on_ray(shared_dir, shared_runs, backend, config)
            return
        serve_on_ray(run_path, backend, config, log=lambda line: click.echo(line, err=True),
                     on_ready=lambda url: click.echo(
                         f"serving {run_path} ({config.replicas} Ray Serve replica"
                         f"{'s' * (config.replicas != 1)}) at {url} (Ctrl+C to stop)"))
        click.echo("stopped")
        return
    if replicas is not None or ray_address is not None or (
            batch_wait_ms is not None and shared_dir is None):
        raise ConfigError("--replicas and --ray-address need --engine ray, --batch-wait-ms "
                          "--engine ray or --shared")

    if importlib.util.find_spec("gradio") is None:  # the `ui` extra
        raise ConfigError("serve needs gradio: pip install 'mm-peft-deploy[ui]'")
    from .apps import server
    from .apps.listen import bind
    from .apps.service import Classifier, ServeLimits

    listener = bind(host, port)  # a busy port fails before the model loads
    limits = ServeLimits(max_images=max_images, max_file_bytes=max_file_mb * 2**20)
    config = server.ServeConfig(host=host, port=port, concurrency=concurrency,
                                max_queue=max_queue, limits=limits,
                                graceful_seconds=grace_seconds, show_paths=show_paths)
    if shared_dir is not None:
        _serve_shared(shared_dir, shared_runs, allow_add, backend, config, listener,
                      2.0 if batch_wait_ms is None else batch_wait_ms)
        return
    classifier = Classifier(run_path, backend, limits, precision)
    for reason in classifier.skipped:
        click.echo(f"not using {reason}", err=True)
    server.serve(classifier, config, listener, on_ready=lambda url: click.echo(
        f"serving {run_path} ({classifier.details['adapter']}, {classifier.backend}, precision "
        f"{classifier.precision}) at {url} (Ctrl+C to stop)"))
    click.echo("stopped")


def _serve_shared(shared_dir, runs, allow_add, backend, config, listener, wait_ms) -> None:
    """`serve --shared DIR`: the adapters of DIR through one trunk (apps.shared_server)."""
    from .apps import server
    from .apps.adapters import AdapterService
    from .apps.shared_server import build_shared_app
    from .runtime.shared import SharedPredictor

    add_run = None
    if allow_add:
        from .exporters.shared import add_to_shared

        def add_run(path: Path) -> str:
            return add_to_shared(shared_dir, path, log=lambda line: click.echo(line, err=True))

    names = None if runs is None else [name.strip() for name in runs.split(",")]
    service = AdapterService(SharedPredictor(shared_dir, backend, names), config.limits,
                             config.concurrency, add_run, wait_ms)
    try:
        server.serve_app(lambda examples: build_shared_app(service, config, examples), config,
                         listener, on_ready=lambda url: click.echo(
                             f"serving {shared_dir} ({', '.join(service.adapters)}; "
                             f"{service.backend}) at {url} (Ctrl+C to stop)"))
    finally:
        service.close()
    click.echo("stopped")


def _serve_shared_on_ray(shared_dir, runs, backend, config) -> None:
    """`serve --shared DIR --engine ray`: the adapters of DIR on Ray Serve (apps.ray_shared)."""
    from .apps.ray_shared import serve_shared_on_ray

    names = None if runs is None else [name.strip() for name in runs.split(",")]
    serve_shared_on_ray(shared_dir, backend, names, config,
                        log=lambda line: click.echo(line, err=True),
                        on_ready=lambda url: click.echo(
                            f"serving {shared_dir} ({config.replicas} Ray Serve replica"
                            f"{'s' * (config.replicas != 1)}) at {url} (Ctrl+C to stop)"))
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
