"""The export formats: format name -> how to build it into the staging folder; and the plan
of one `mmdeploy export` (`plan_export`).

Each builder gets the deploy form and an empty staging folder, writes its files there and
returns what the shared path in `export.py` needs: the files to publish, a callable that
runs them (for parity) and the facts to record in the manifest. Staging, parity, keeping a
failed export aside and publishing are the same for every format. A new format is one
builder and one line in `FORMATS`. After the formats come the exports derived from the
verified ONNX graph (`DERIVED`): ONNX Runtime's INT8 graph and a Triton repository.
`--format auto` is every format this machine can build (`Format.build_problem`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmdeploy.artifacts import RunDir
from mmdeploy.config import ExportConfig
from mmdeploy.errors import ArtifactError, BackendUnavailableError, ConfigError
from mmdeploy.interface import INPUT_NAME, OUTPUT_NAMES, QUESTION_INPUT_NAMES
from mmdeploy.runs import load_run_config
from mmdeploy.runtime.aoti import PACKAGE_FILE, AotiPackage
from mmdeploy.runtime.onnxruntime import ONNX_FILE, OnnxSession
from mmdeploy.runtime.tensorrt import (
    Profile,
    load_engine,
    question_profiles,
    unavailable_reason,
)
from mmdeploy.runtime.timing import TYPICAL_QUESTIONS

from .aoti import compile_inputs, fp16_problem
from .calibration import calibration_reader
from .lint import check_for_target, lint_onnx
from .onnx import Axis, GraphInput, batch_input, export_graph
from .tensorrt import build_engine, build_int8_engine

Outputs = dict[str, np.ndarray]


@dataclass
class ExportJob:
    """One format to build: the deploy form, where it goes, and at which precision."""

    deploy: nn.Module
    run_dir: RunDir
    config: ExportConfig
    precision: str
    device: str
    log: Callable[[str], None] = print
    task: str = "classification"  # the run's: a vqa run's engine takes its question too

    @property
    def image_size(self) -> tuple[int, int]:
        return self.deploy.backbone.preprocessor.image_size

    def graph_inputs(self) -> list[GraphInput]:
        """What the engine takes, with samples to trace: pixels, and for a vqa run the
        question's tokens (`graph_inputs`)."""
        return graph_inputs(self.deploy, self.task, self.config.batch_min,
                            self.config.batch_max)


def typical_question_tokens(backbone) -> int:
    """A typical question's tokens on `backbone`'s tokenizer (the longer of the typical
    questions, within its limit): the OPT length of a TensorRT profile."""
    tokens = backbone.tokenize(list(TYPICAL_QUESTIONS))["input_ids"]
    return min(int(tokens.shape[1]), backbone.max_text_length)


def graph_inputs(deploy: nn.Module, task: str, batch_min: int,
                 batch_max: int) -> list[GraphInput]:
    """The engine's inputs: `pixel_values` with a dynamic batch; for a vqa run also
    `input_ids` and `attention_mask` [batch, tokens], the token axis dynamic from 1 to the
    tokenizer's limit (`Backbone.max_text_length`). The samples are a batch of at least 2
    (torch.export specialises a size of 1) of two questions of different lengths, so the
    sample has padded rows, and as many tokens as no batch (two equal sizes may be tied)."""
    batch = max(2, batch_min)
    image_size = deploy.backbone.preprocessor.image_size
    pixels = batch_input(INPUT_NAME, torch.randn(batch, 3, *image_size), batch_min, batch_max)
    if task != "vqa":
        return [pixels]
    backbone = deploy.backbone
    tokens = backbone.tokenize([TYPICAL_QUESTIONS[row % 2] for row in range(batch)])
    ids, mask = (tokens[name].cpu() for name in QUESTION_INPUT_NAMES)
    if ids.shape[1] == batch:
        ids, mask = ids[:, :-1], mask[:, :-1]
    axes = {0: pixels.axes[0], 1: Axis("tokens", 1, backbone.max_text_length)}
    return [pixels, GraphInput(QUESTION_INPUT_NAMES[0], ids, axes),
            GraphInput(QUESTION_INPUT_NAMES[1], mask, axes)]


@dataclass
class Built:
    """What a builder made. `files` are names in the staging folder, the main file first;
    `interface` (inputs, outputs, opset) as read from the graph where there is one; `device`
    the one it was compiled for (None: any); `details` the format's own facts. The export
    record is made of these."""

    backend: str
    files: list[str]
    candidate: Callable[[np.ndarray], Outputs]
    details: dict
    interface: dict = field(default_factory=dict)
    device: str | None = None


@dataclass(frozen=True)
class Format:
    backend: str
    build: Callable[[ExportJob, Path], Built]
    fp16_problem: Callable[[str], str | None]  # device -> why no FP16 there, or None
    needs_onnx: bool = False
    # device -> why this machine cannot build the format there, or None
    build_problem: Callable[[str], str | None] = lambda device: None


def _aoti_build_problem(device: str) -> str | None:
    """On CPU AOTInductor compiles C++: without the compiler it would fail after tracing."""
    if device != "cpu":
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own untyped errors for a missing compiler
        return f"AOTInductor on CPU needs a C++ compiler ({str(exc).splitlines()[0]})"
    return None


def _build_onnx(job: ExportJob, staging: Path) -> Built:
    path = staging / ONNX_FILE
    interface, details = onnx_graph_of(job.deploy, path, job.graph_inputs(), job.config,
                                       job.log)
    files = sorted(p.name for p in staging.iterdir() if p.is_file())  # + model.onnx.data
    return Built("onnxruntime", files, OnnxSession(path), details, interface)


def onnx_graph(model: nn.Module, path: Path, sample: torch.Tensor, config: ExportConfig,
               log: Callable[[str], None], input_name: str = INPUT_NAME,
               output_names: tuple[str, ...] = OUTPUT_NAMES) -> tuple[dict, dict]:
    """`onnx_graph_of` a one-input model (`sample`: batch first, a batch of at least 2)."""
    return onnx_graph_of(model, path,
                         [batch_input(input_name, sample, config.batch_min, config.batch_max)],
                         config, log, output_names)


def onnx_graph_of(model: nn.Module, path: Path, inputs: list[GraphInput],
                  config: ExportConfig, log: Callable[[str], None],
                  output_names: tuple[str, ...] = OUTPUT_NAMES) -> tuple[dict, dict]:
    """Export `model` to ONNX at `path` (`onnx.export_graph`) and lint it for
    `config.target` (an error for tensorrt, warnings logged otherwise): the graph's
    interface (inputs, outputs, opset) and the facts its record keeps."""
    info = export_graph(model, path, inputs, output_names, config.opset)
    findings = check_for_target(lint_onnx(path), config.target)
    for finding in findings:
        log(f"warning: {finding}")
    details = {"export_seconds": info["seconds"], "nodes": info["nodes"],
               "nodes_before_onnxslim": info["nodes_exported"],
               "lint": [str(f) for f in findings], "target": config.target}
    return {"inputs": info["inputs"], "outputs": info["outputs"], "opset": config.opset}, details


def _build_aoti(job: ExportJob, staging: Path) -> Built:
    path = staging / PACKAGE_FILE
    details = compile_inputs(job.deploy, path, job.graph_inputs(), job.device, job.precision)
    job.log(f"compiled {PACKAGE_FILE} for {job.device} in {details['compile_seconds']:.1f} s")
    return Built("aoti", [PACKAGE_FILE], AotiPackage(path, job.device, job.precision), details,
                 device=job.device)


def _build_tensorrt(job: ExportJob, staging: Path) -> Built:
    onnx_path = job.run_dir.export_dir / ONNX_FILE  # the verified, published graph
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path}: missing; TensorRT builds from the verified ONNX "
                            "export (add onnx to --format)")
    check_for_target(lint_onnx(onnx_path), "tensorrt")
    config = job.config
    profile = Profile.for_batches(config.batch_min, config.batch_opt, config.batch_max,
                                  job.image_size)
    questions: tuple[Profile, ...] = ()
    if job.task == "vqa":
        backbone = job.deploy.backbone
        questions = question_profiles(config.batch_min, config.batch_opt, config.batch_max,
                                      job.image_size, typical_question_tokens(backbone),
                                      backbone.max_text_length)[1:]
    extra_files = []
    if job.precision == "int8" and job.task == "vqa":
        raise ConfigError("a TensorRT INT8 engine is calibrated on images alone; for a vqa "
                          "run quantize the ONNX graph instead (--int8 with --format onnx)")
    if job.precision == "int8":  # explicit quantization: a symmetric QDQ graph, calibrated
        reader = calibration_reader(load_run_config(job.run_dir), job.deploy.backbone.preprocessor,
                                    config.calib, config.calib_seed)
        engine, sidecar, details = build_int8_engine(onnx_path, staging, profile, reader, job.log)
        extra_files = details["qdq"]["files"]  # the graph the engine was built from
    else:
        engine, sidecar, details = build_engine(onnx_path, staging, profile, job.precision,
                                                job.log, questions)
    details.update({"engine": engine, "sidecar": sidecar, "profile": profile.to_dict()})
    if questions:
        details["question_profiles"] = [p.to_dict() for p in questions]
    return Built("tensorrt", [engine, sidecar, *extra_files],
                 load_engine(staging, engine, sidecar), details, device="cuda")


FORMATS: dict[str, Format] = {
    "onnx": Format("onnxruntime", _build_onnx,
                   lambda device: "the ONNX graph stays FP32 (TensorRT builds FP16 from it)"),
    "aoti": Format("aoti", _build_aoti, fp16_problem, build_problem=_aoti_build_problem),
    "tensorrt": Format("tensorrt", _build_tensorrt, lambda device: None, needs_onnx=True,
                       build_problem=lambda device: unavailable_reason()),
}

AUTO = "auto"
"""`--format auto`: every format this machine can build, each then timed at the export's
OPT batch and the timings kept in its record, so `pick_backend` serves the fastest."""


DERIVED = ("int8", "triton")
"""Made from the verified ONNX graph once the formats are published, in this order."""


@dataclass(frozen=True)
class ExportPlan:
    """What one `export_run` does, in order: each format at its precision, then the derived
    exports: quantize the ONNX graph to INT8 (`int8`), write a Triton repository (`triton`);
    with `--format auto`, time each format built (`timed`); `left_out`: the formats `auto`
    could not build here, and why."""

    formats: list[tuple[str, str]]
    int8: bool
    triton: bool
    timed: bool = False
    left_out: dict[str, str] = field(default_factory=dict)


def plan_export(config: ExportConfig, has_onnx: bool, device: str) -> ExportPlan:
    """The plan for `config` on a run that has (`has_onnx`) a verified ONNX export or not,
    checked before anything is loaded or built: the derived exports bring in the ONNX export
    when the run has none, and a missing extra is said first."""
    requested = tuple(config.formats)
    triton, timed = "triton" in requested, AUTO in requested
    formats = tuple(f for f in requested if f not in ("triton", AUTO))
    left_out = {}
    if timed:
        problems = {name: fmt.build_problem(device) for name, fmt in FORMATS.items()}
        formats += tuple(name for name, problem in problems.items() if problem is None)
        left_out = {name: problem for name, problem in problems.items() if problem}
    if triton:
        from .triton import model_config_pb2

        model_config_pb2()  # the [triton] extra missing: one line, before anything is built
    formats, int8 = _int8_targets(formats, config, has_onnx)
    if triton and not has_onnx and "onnx" not in formats:
        formats = ("onnx", *formats)
    return ExportPlan(plan_formats(formats, config.fp16, device, has_onnx,
                                   int8=config.int8 is not None), int8, triton, timed, left_out)


def _int8_targets(formats: tuple[str, ...], config: ExportConfig,
                  has_onnx: bool) -> tuple[tuple[str, ...], bool]:
    """The formats to export, and whether to quantize the ONNX graph for ONNX Runtime.

    `--int8` with onnx (or with no format: the run's verified model.onnx, exported first if
    it has none) makes model.int8.onnx; with tensorrt it builds a TensorRT INT8 engine.
    """
    if not config.int8:
        return formats, False
    if "onnx" in formats:
        return formats, True
    if "tensorrt" in formats:
        return formats, False
    if formats:
        raise ConfigError("--int8 quantizes the ONNX graph (onnx) or builds a TensorRT INT8 "
                          "engine (tensorrt): add one to --format, or leave --format out to "
                          "quantize the run's verified model.onnx")
    return (() if has_onnx else ("onnx",)), True


def plan_formats(formats: tuple[str, ...], fp16: bool, device: str,
                 has_onnx: bool, int8: bool = False) -> list[tuple[str, str]]:
    """(format, precision) in build order, checked before anything is loaded or built.

    Formats that build from the ONNX graph come after it, and bring it in when the run has
    none yet. With `fp16`, every format with an FP16 path on `device` builds FP16; the ONNX
    graph stays FP32 (it is what TensorRT reads); any other format without one is refused,
    as is an `fp16` request that nothing would honour. With `int8`, TensorRT builds an INT8
    engine (with FP16 fallback) from a QDQ graph; ONNX Runtime's INT8 graph is quantized
    after the formats, by `export.py`.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown export format(s) {', '.join(unknown)}; "
                          f"available: {', '.join(FORMATS)}")
    wanted = set(formats)
    if not has_onnx and any(FORMATS[f].needs_onnx for f in wanted):
        wanted.add("onnx")
    for fmt in sorted(wanted):
        if reason := FORMATS[fmt].build_problem(device):
            raise BackendUnavailableError(FORMATS[fmt].backend, reason)
    plan = []
    for fmt in (f for f in FORMATS if f in wanted):  # the table's order: onnx first
        problem = FORMATS[fmt].fp16_problem(device) if fp16 else None
        if problem and fmt != "onnx":
            raise ConfigError(f"--fp16: {fmt} has no FP16 export here: {problem}")
        if int8 and fmt == "tensorrt":
            plan.append((fmt, "int8"))
            continue
        plan.append((fmt, "fp16" if fp16 and not problem else "fp32"))
    if fp16 and all(precision == "fp32" for _, precision in plan):
        raise ConfigError("--fp16: none of the requested formats has an FP16 export (FP16 is "
                          "built by tensorrt, and by aoti on CUDA)")
    return plan
