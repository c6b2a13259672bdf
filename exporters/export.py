"""Export a run: merge and freeze, compile, check, verify parity, then publish.

Every format (`formats.FORMATS`: onnx, aoti, tensorrt) goes through the same path here.
Files are written to `export/.staging/` first. Only an export that passes the op lint and
parity moves into `export/` and into `manifest.json`; one that fails is kept aside as
`export/<file>.failed` with its report beside it, and never served. An earlier good export
stays untouched either way.

With `config.int8`, the published FP32 graph is then quantized to `model.int8.onnx`
(`int8.py`) and held to the accuracy gate (`gate.py`) instead of parity; it is published or
kept aside the same way, and recorded as the manifest's "int8" export.

Each published export is one `ExportRecord` in the manifest, under its format's name: its
files and hashes, backend, precision, interface, its own batch range and its check report.

`--format auto` exports every format this machine can build, then times each one through
the predictor that serves it, briefly, at the export's OPT batch (`_time_exports`), and
keeps the timing in its record: `pick_backend` serves the fastest one timed on the device
present. This is where timings are normally made; `bench --record` can refresh them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from mmdeploy.artifacts import (
    ExportRecord,
    Manifest,
    RunDir,
    atomic_write_json,
    installed_versions,
)
from mmdeploy.backbone import load_backbone, torch_device
from mmdeploy.config import ExportConfig
from mmdeploy.errors import ArtifactError, MmdeployError
from mmdeploy.interface import OUTPUT_NAMES
from mmdeploy.questions import TOKENIZER_DIR, QuestionTokenizer, save_tokenizer
from mmdeploy.runs import RunConfig, load_model, load_run_config
from mmdeploy.runtime import timing
from mmdeploy.runtime.onnxruntime import INT8_FILE, ONNX_FILE, OnnxSession

from .calibration import PixelReader, calibration_reader
from .formats import FORMATS, ExportJob, plan_export, typical_question_tokens
from .gate import GateBounds, candidate_logits, gate_check, gate_data, measure
from .int8 import Int8Options, Quantizer, quantize_gated
from .onnx import Axis
from .parity import ParityCase, parity_batches, parity_cases, run_parity
from .triton import write_repository

VERSIONED = ("mm-peft-deploy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime",
              "onnxruntime-gpu", "tensorrt")
TIMING_WARMUP, TIMING_ITERS = 3, 10  # `--format auto`: brief, enough to rank backends by


def export_run(run_path: str | Path, config: ExportConfig,
               log: Callable[[str], None] = print) -> Manifest:
    """Export a run as `config` asks (`formats.plan_export`): each format, then what is
    derived from the verified ONNX graph; each published only once it passes its check."""
    run_dir = RunDir(Path(run_path))
    run = load_run_config(run_dir)
    manifest = _existing_manifest(run_dir)
    device = torch_device()
    plan = plan_export(config, manifest.record("onnx") is not None, device)
    for fmt, problem in plan.left_out.items():
        log(f"auto: leaving out {fmt}: {problem}")
    for fmt, precision in plan.formats:
        log(f"will export {fmt} ({precision})")
    if plan.int8:
        log(f"will quantize {ONNX_FILE} to INT8 ({config.int8})")
    if plan.formats or plan.int8:
        log(f"loading {run.adapter} run {run_dir.root}")
        reference, _ = load_model(run_dir.root)
        preprocessor = reference.backbone.preprocessor
        calibration = None
        # a calibration that cannot work fails first
        if plan.int8 and (config.int8 == "static" or config.smooth is not None):
            calibration = calibration_reader(run, preprocessor, config.calib, config.calib_seed,
                                             _tokenizer(reference))
        if plan.formats:
            _export_formats(plan.formats, run_dir, run, config, reference, manifest, device, log)
        if plan.timed:
            _time_exports(run_dir, manifest, [fmt for fmt, _ in plan.formats], log)
        if plan.int8:
            _export_int8(run_dir, run, reference, config, manifest, calibration, log)
            manifest.save(run_dir.manifest_path)
    if plan.triton:
        write_repository(run_dir.root, config.triton_out, log)
        manifest = Manifest.load(run_dir.manifest_path)  # with the repository's record
    return manifest


def _export_formats(plan: list[tuple[str, str]], run_dir: RunDir, run: RunConfig,
                    config: ExportConfig, reference, manifest: Manifest, device: str,
                    log: Callable[[str], None]) -> None:
    # A second copy on its own backbone: merging and freezing must not touch the reference.
    backbone = load_backbone(run.backbone, expected_identity=run.backbone_identity)
    deploy = load_model(run_dir.root, backbone=backbone)[0].to_deploy()
    seed = int.from_bytes(os.urandom(4), "little")
    cases = parity_cases(run, reference.backbone, parity_batches(config), seed)
    form_gap = _form_gap(reference, deploy, cases)
    log(f"deploy form vs training form: max abs {form_gap:.2e}")

    for fmt, precision in plan:
        log(f"exporting {fmt} {precision} (batch {config.batch_min}..{config.batch_max})")
        job = ExportJob(deploy, run_dir, config, precision, device, log, run.task)
        _export_format(fmt, job, reference, cases, manifest)
        # Saved after each format: a later one failing leaves this one listed and servable.
        manifest.deploy_form_max_abs, manifest.parity_seed = form_gap, seed
        manifest.save(run_dir.manifest_path)


def _time_exports(run_dir: RunDir, manifest: Manifest, names: list[str],
                  log: Callable[[str], None]) -> None:
    """Time each export in `names` as it is served (its runtime predictor, on the device it
    picks) at its OPT batch, and keep the timing in its record."""
    for name in names:
        record = manifest.exports[name]
        try:
            runner = timing.predictor_runner(run_dir.root, record.backend)
        except MmdeployError as exc:  # built here, but cannot run here (a TensorRT mismatch)
            log(f"not timing {record.backend}: {exc}")
            continue
        batch = record.batch_range["opt"]
        shape = (batch, *record.inputs[0]["shape"][1:])  # [batch, 3, H, W]
        pixels = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        median_ms = timing.measure(runner, pixels, TIMING_WARMUP, TIMING_ITERS).median_ms
        record.add_timing(timing.recorded(runner.device, batch, median_ms, "export"))
        log(f"timed {record.backend} on {runner.device}: {median_ms:.2f} ms at batch {batch} "
            f"(median of {TIMING_ITERS})")
    manifest.save(run_dir.manifest_path)


def _export_int8(run_dir: RunDir, run: RunConfig, reference, config: ExportConfig,
                 manifest: Manifest, calibration: PixelReader | None,
                 log: Callable[[str], None]) -> None:
    """Quantize the published FP32 graph, gate it, then publish or keep it aside."""
    export_dir = run_dir.export_dir
    onnx = manifest.exports["onnx"]
    onnx.verify_files(export_dir)
    preprocessor = reference.backbone.preprocessor
    data = gate_data(run, reference, preprocessor)
    bounds = GateBounds(config.gate_agreement, config.gate_drop)
    what = "held-out images with their questions (VQA accuracy)" if run.task == "vqa" \
        else "real images"
    log(f"INT8 gate: top-1 agreement >= {bounds.min_agreement:.2%} and accuracy drop <= "
        f"{bounds.max_drop_points:g} points vs the FP32 model, on {len(data)} {what}")

    def gate(path: Path):
        return measure(data, candidate_logits(OnnxSession(path), data.inputs), bounds)

    def probe():  # training images; the gate's own when the training data is gone
        if calibration is not None:
            return calibration.inputs
        try:
            return calibration_reader(run, preprocessor, config.calib or 64,
                                      config.calib_seed, _tokenizer(reference)).inputs
        except ArtifactError as exc:
            log(f"int8: ranking on the gate's images instead ({exc})")
            return data.inputs

    with staging_dir(export_dir) as staging:
        with tempfile.TemporaryDirectory(prefix="mmdeploy-int8-") as work:
            options = Int8Options(per_channel=config.int8_per_channel,
                                  smooth_alpha=config.smooth, symmetric=config.int8_symmetric,
                                  fallback_order=config.fallback_order)
            quantizer = Quantizer(export_dir / ONNX_FILE, config.int8, Path(work), calibration,
                                  config.calib_method, options, run_dir.weights_path)
            result = quantize_gated(quantizer, gate, probe, log)
            os.replace(result.path, staging / INT8_FILE)
        if not result.report.passed:
            keep_aside(staging, export_dir, result.to_dict(INT8_FILE), INT8_FILE)
            result.raise_if_failed(f"{INT8_FILE}.failed")
        record = ExportRecord(
            backend="onnxruntime", precision="int8", batch_range=dict(onnx.batch_range),
            check=result.report.to_dict(), inputs=onnx.inputs, outputs=onnx.outputs,
            opset=onnx.opset, versions=installed_versions(VERSIONED),
            details={**result.details(), "serve_default": config.serve_int8,
                     **{k: v for k, v in onnx.details.items() if k.endswith("question_tokens")}})
        publish(staging, export_dir, record, [INT8_FILE])
        for name in onnx.files:  # a vqa graph's tokenizer serves the INT8 graph too
            if name.startswith(f"{TOKENIZER_DIR}/"):
                record.add_file(export_dir, name)
    manifest.exports["int8"] = record
    log(f"{INT8_FILE} passed the INT8 gate ({result.report.summary()}); "
        f"{len(result.kept_fp32)} MatMul(s) moved back to FP32, quantized in "
        f"{result.quantize_seconds:.1f} s")


def _export_format(fmt: str, job: ExportJob, reference, cases, manifest: Manifest) -> None:
    """Build into export/.staging/, check parity, then publish or keep aside."""
    export_dir = job.run_dir.export_dir
    with staging_dir(export_dir) as staging:
        built = FORMATS[fmt].build(job, staging)
        if job.task == "vqa":  # served with the tokenizer it was checked with
            built.files += _save_tokenizer(job, staging)
            built.details["max_question_tokens"] = job.deploy.backbone.max_text_length
            built.details["typical_question_tokens"] = typical_question_tokens(
                job.deploy.backbone)
        if job.precision == "int8":  # INT8 moves logits by design: held to the gate instead
            job.log(f"checking {built.backend} int8 against the accuracy gate")
            report = gate_check(load_run_config(job.run_dir), reference, built.candidate,
                                GateBounds(job.config.gate_agreement, job.config.gate_drop),
                                f"{built.backend} int8", batch=job.config.batch_max)
        else:
            batches = ", ".join(map(str, parity_batches(job.config)))
            lengths = " and question lengths" if job.task == "vqa" else ""
            job.log(f"checking {built.backend} parity at batch {batches}{lengths} (random and "
                    "real images)")
            report = run_parity(built.backend, job.precision, reference, built.candidate, cases)
        if not report.passed:
            keep_aside(staging, export_dir, report.to_dict(), built.files[0])
            report.raise_if_failed()
        interface = built.interface or _interface(job, reference, cases)
        record = ExportRecord(
            backend=built.backend, precision=job.precision, device=built.device,
            batch_range={"min": job.config.batch_min, "opt": job.config.batch_opt,
                         "max": job.config.batch_max},
            check=report.to_dict(), inputs=interface["inputs"], outputs=interface["outputs"],
            opset=interface.get("opset"), versions=installed_versions(VERSIONED),
            details=built.details)
        publish(staging, export_dir, record, built.files)
    manifest.exports[fmt] = record
    job.log(f"{built.backend} {job.precision}: passed {report.title} ({report.summary()})")


def _tokenizer(model) -> QuestionTokenizer | None:
    """A vqa model's tokenizer at its limit, as training tokenized; None for others."""
    if getattr(model, "task", "classification") != "vqa":
        return None
    return QuestionTokenizer(model.backbone.tokenizer, model.backbone.max_text_length)


def _save_tokenizer(job: ExportJob, staging: Path) -> list[str]:
    """The run's tokenizer and its limit into `staging/tokenizer/`: its files, to publish
    and hash with the engine's."""
    backbone = job.deploy.backbone
    names = save_tokenizer(backbone.tokenizer, backbone.max_text_length, staging / TOKENIZER_DIR)
    return [f"{TOKENIZER_DIR}/{name}" for name in names]


def _interface(job: ExportJob, reference, cases: list[ParityCase]) -> dict:
    """Inputs and outputs of a compiled export, as the ONNX graph describes its own: the
    deploy form's, with the batch (and a question's tokens) as named axes."""
    inputs = tuple(x[:1] for x in cases[0].inputs)
    with torch.inference_mode():
        logits, embeddings = reference(*inputs)
    return {"inputs": [describe(graph_input.name, graph_input.sample, graph_input.axes)
                       for graph_input in job.graph_inputs()],
            "outputs": [describe(name, tensor)
                        for name, tensor in zip(OUTPUT_NAMES, (logits, embeddings), strict=True)]}


def describe(name: str, tensor: torch.Tensor, axes: dict[int, Axis] | None = None) -> dict:
    """One input or output of an export: its name, dtype and shape, its dynamic axes (the
    batch, unless `axes` says which) named."""
    names = {position: axis.name for position, axis in (axes or {0: Axis("batch", 1, 1)}).items()}
    return {"name": name, "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": [names.get(i, size) for i, size in enumerate(tensor.shape)]}


def _form_gap(reference, deploy, cases: list[ParityCase]) -> float:
    with torch.inference_mode():
        return max(float((reference(*c.inputs)[0] - deploy(*c.inputs)[0]).abs().max())
                   for c in cases)


def _existing_manifest(run_dir: RunDir) -> Manifest:
    if not run_dir.manifest_path.exists():
        return Manifest()
    try:
        return Manifest.load(run_dir.manifest_path)
    except ArtifactError:
        return Manifest()  # unreadable: start afresh, the files it named are re-exported


@contextlib.contextmanager
def staging_dir(export_dir: Path, name: str = ".staging") -> Iterator[Path]:
    """An empty `export/.staging/` (or `name`) for one export's files, removed afterwards
    whatever happens: what passed its check has been moved into export/ by then."""
    staging = export_dir / name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, export_dir: Path, record: ExportRecord, files: list[str]) -> None:
    """Move `files` (names in `staging`; a name in a folder, e.g. `tokenizer/vocab.json`,
    moves its whole folder, which replaces the one published before) into `export_dir`,
    hashing each into `record`."""
    folders = sorted({Path(name).parts[0] for name in files if len(Path(name).parts) > 1})
    for folder in folders:
        _replace_folder(staging / folder, export_dir / folder)
    for name in files:
        if len(Path(name).parts) == 1:
            os.replace(staging / name, export_dir / name)
        record.add_file(export_dir, name)


def _replace_folder(source: Path, target: Path) -> None:
    """`source` renamed to `target`; an earlier `target` is renamed out of the way first and
    removed after, so `target` is never half written."""
    old = target.with_name(f"{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def keep_aside(staging: Path, export_dir: Path, report: dict, primary: str) -> None:
    for path in sorted(staging.iterdir()):
        if path.is_dir():
            _replace_folder(path, export_dir / f"{path.name}.failed")
        else:
            os.replace(path, export_dir / f"{path.name}.failed")
    atomic_write_json(export_dir / f"{primary}.failed.json", report)

