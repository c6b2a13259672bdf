"""INT8 on ONNX Runtime: quantize the verified FP32 graph, and back off where it costs answers.

Only MatMul/Gemm nodes with a constant weight are quantized: they are nearly all the work
of a ViT, and ONNX Runtime's CPU kernels run them in INT8 at about 0.3x the FP32 time
(export-notes). Two methods:

- dynamic (default): weights INT8 per tensor, activations quantized on the fly per batch;
  no calibration, and no activation range fixed in advance, so ViT activation outliers
  cost little;
- static: weights INT8 per channel and activations UINT8 (QDQ), with ranges calibrated
  once on the run's training images (`calibration.py`); ORT fuses U8 activations well
  (S8 activations run at 0.8-1.0x FP32 there, so they are not offered).

Kept in FP32 from the start (`fp32_from_start`): the FP16 plan's nodes (normalisation,
softmax, the router's and the kNN graph's scores, top-k and masks, `precision.fp32_nodes`)
and the cosine head (`precision.head_nodes`), where classes differ in the third decimal.
Products of two activations (attention) are never quantized.

When the accuracy gate (`gate.py`) fails, each group of quantized MatMuls (at most
`MAX_GROUPS` runs of consecutive nodes, a transformer block or so each) is ranked by how
much the logit error on training images falls when only that group stays FP32; the most
sensitive groups move back to FP32 one at a time, re-gated after each, until the gate
passes, or until more than `MAX_FP32_SHARE` of the MatMul work would be FP32 (INT8 no
longer pays): then the result fails, with every step in its report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mmdeploy.errors import ConfigError
from mmdeploy.runtime.onnxruntime import OnnxSession, onnxruntime_required

from .calibration import PixelReader
from .gate import GateReport, candidate_logits
from .precision import fp32_nodes, head_nodes

with onnxruntime_required():
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

METHODS = ("dynamic", "static")
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}
# What ONNX Runtime's INT8 graph quantizes: the MatMuls and Gemms with a constant weight. The
# patch-embedding Conv stays FP32 here; TensorRT's QDQ graph quantizes it too
# (`precision.TENSORRT_INT8_OPS`).
ORT_INT8_OPS = ("MatMul", "Gemm")
MAX_GROUPS = 16
MAX_FP32_SHARE = 0.5


def fp32_from_start(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes never quantized, in graph order (see the module docstring)."""
    keep = set(fp32_nodes(model)) | head_nodes(model)
    return [node.name for node in model.graph.node if node.name in keep]


def quantizable(model: onnx.ModelProto, excluded: list[str]) -> dict[str, int]:
    """{node: multiply-adds per image} for the MatMul/Gemm nodes with a constant weight that
    are not `excluded`, in graph order. The batch axis counts as 1; token axes count."""
    weights = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    shapes = _shapes(model)
    skip = set(excluded)
    work = {}
    for node in model.graph.node:
        if node.op_type in ORT_INT8_OPS and node.name not in skip and node.input[1] in weights:
            dims = shapes.get(node.input[0], [])
            rows = int(np.prod([d for d in dims[1:-1] if isinstance(d, int) and d > 0]))
            work[node.name] = rows * weights[node.input[1]]
    return work


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info]
    return {v.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in v.type.tensor_type.shape.dim] for v in values}


@dataclass
class Quantizer:
    """Writes INT8 versions of one FP32 graph with a given set of nodes left FP32.

    Static calibration runs once, on the first build; later builds (the fallback's) reuse
    its ranges from a cache file in `workdir`. It runs one batch at a time (ORT's
    `CalibStridedMinMax`, which works for every method): holding every intermediate output
    of 64 ViT-B images would take gigabytes, and histogram methods cannot stack batches of
    different sizes. ORT's `CalibMaxIntermediateOutputs` is left unset: in onnxruntime 1.32
    it drops the collected data.
    """

    source: Path
    method: str
    workdir: Path
    calibration: PixelReader | None = None
    calibrate_method: str = "minmax"
    seconds: float = 0.0
    builds: int = 0
    excluded_from_start: list[str] = field(init=False)
    work: dict[str, int] = field(init=False)  # quantizable node -> multiply-adds per image
    _gemms: set[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown INT8 method {self.method!r}; choose from "
                              f"{', '.join(METHODS)}")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ConfigError(f"unknown calibration method {self.calibrate_method!r}; choose "
                              f"from {', '.join(CALIBRATION_METHODS)}")
        if self.method == "static" and self.calibration is None:
            raise ConfigError("static INT8 needs calibration images; use --int8 dynamic")
        self.source = _linked_into(self.source, self.workdir)
        model = onnx.load(str(self.source))
        self.excluded_from_start = fp32_from_start(model)
        self.work = quantizable(model, self.excluded_from_start)
        self._gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
        if not self.work:
            raise ConfigError(f"{self.source.name}: no MatMul/Gemm with a constant weight to "
                              "quantize")

    @property
    def calibration_record(self) -> dict | None:
        """How the static ranges were calibrated (None for dynamic), for the manifest."""
        reader = self.calibration
        if self.method != "static" or reader is None:
            return None
        return {"images": len(reader.pixels), "method": self.calibrate_method,
                "seed": reader.seed, "split": reader.split}

    @property
    def per_channel(self) -> bool:
        # ORT's dynamic MatMulInteger refuses per-channel zero points on transposed weights.
        return self.method == "static"

    def build(self, keep_fp32: list[str]) -> Path:
        """Quantize with `keep_fp32` (and the nodes excluded from the start) left FP32."""
        self.builds += 1
        target = self.workdir / f"trial-{self.builds}.onnx"
        exclude = [*self.excluded_from_start, *keep_fp32]
        # The dynamic quantizer first rewrites each Gemm as `<name>_MatMul` plus an Add.
        exclude += [f"{name}_MatMul" for name in exclude if name in self._gemms]
        started = time.perf_counter()
        with quiet_quantizer():
            if self.method == "dynamic":
                quantize_dynamic(self.source, target, op_types_to_quantize=list(ORT_INT8_OPS),
                                 weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                                 per_channel=False)
            else:
                self.calibration.rewind()
                quantize_static(
                    self.source, target, self.calibration, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(ORT_INT8_OPS), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    calibrate_method=CALIBRATION_METHODS[self.calibrate_method],
                    calibration_cache_path=self.workdir / "calibration.json",
                    extra_options={"MatMulConstBOnly": True, "CalibStridedMinMax": 1})
        self.seconds += time.perf_counter() - started
        return target


def _linked_into(source: Path, workdir: Path) -> Path:
    """`source` (and its external data) as symlinks in `workdir`: ONNX Runtime's quantizer
    writes a shape-inferred copy beside the graph it reads, on every build, and that must
    not land in the run's export folder (a write there, hundreds of MB at ViT-B/16, and one
    name shared by two quantizations of the same run)."""
    linked = workdir / source.name
    if linked.resolve() == source.resolve():
        return source
    for path in (source, source.with_name(f"{source.name}.data")):
        if path.is_file():
            (workdir / path.name).symlink_to(path.resolve())
    return linked


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """ORT's quantizer logs advice ("consider pre-processing") on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass
class Int8Result:
    """What quantization produced: the graph (`path`), its gate report and how it got there."""

    path: Path
    method: str
    calibration: dict | None
    excluded_from_start: list[str]
    kept_fp32: list[str]
    report: GateReport
    fallback_steps: list[dict]
    int8_share: float
    quantize_seconds: float
    per_channel: bool
    stopped: str | None = None  # why the fallback gave up, when the gate still fails

    def details(self) -> dict[str, Any]:
        """How the graph was made: what its INT8 export record keeps beside its gate report."""
        return {"method": self.method, "calibration": self.calibration,
                "per_channel": self.per_channel, "kept_fp32": self.kept_fp32,
                "excluded_from_start": self.excluded_from_start,
                "int8_share": round(self.int8_share, 4),
                "quantize_seconds": round(self.quantize_seconds, 3),
                "fallback_steps": self.fallback_steps, "fallback_stopped": self.stopped}

    def to_dict(self, file: str) -> dict[str, Any]:
        """The report of an export kept aside (`<file>.failed.json`)."""
        return {"file": file, **self.details(), "gate": self.report.to_dict()}

    def raise_if_failed(self, kept_aside: str) -> None:
        self.report.raise_if_failed(f"{self.report.summary()}; {len(self.kept_fp32)} MatMul(s) "
                                    f"back in FP32, then {self.stopped}; kept aside as "
                                    f"{kept_aside} with its report")


def quantize_gated(quantizer: Quantizer, gate: Callable[[Path], GateReport],
                   probe: Callable[[], np.ndarray], log: Callable[[str], None] = print,
                   ) -> Int8Result:
    """Quantize, gate, and on failure move the most sensitive MatMul groups back to FP32.

    `gate` measures a candidate graph file; `probe` gives the images (training split) the
    sensitivity is measured on, only asked for when the first gate fails.
    """
    work = quantizer.work
    total = sum(work.values())
    path = quantizer.build([])
    report = gate(path)
    log(f"int8 {quantizer.method}, {len(work)} MatMul(s) quantized: {_status(report)}")
    kept: list[str] = []
    steps: list[dict] = []
    stopped = None
    if not report.passed:
        stopped = "no MatMul group was left to move back to FP32"
        for group, sensitivity in _ranked_groups(quantizer, path, list(work), probe, log):
            share = sum(work[n] for n in [*kept, *group]) / total
            if share > MAX_FP32_SHARE:
                stopped = (f"the next group would put {share:.1%} of the MatMul work in FP32 "
                           f"(INT8 stops paying beyond {MAX_FP32_SHARE:.0%})")
                break
            kept += group
            os.unlink(path)
            path = quantizer.build(kept)
            report = gate(path)
            steps.append({"kept_fp32": group, "sensitivity": sensitivity,
                          "fp32_share": round(share, 4), "gate": report.to_dict()})
            log(f"int8: {group[0]}..{group[-1]} ({len(group)}) back to FP32, {share:.0%} of "
                f"the MatMul work FP32: {_status(report)}")
            if report.passed:
                stopped = None
                break
    if stopped:
        log(f"int8: stopping: {stopped}")
    return Int8Result(
        path=path, method=quantizer.method, calibration=quantizer.calibration_record,
        kept_fp32=kept,
        excluded_from_start=quantizer.excluded_from_start, report=report,
        fallback_steps=steps, int8_share=1 - sum(work[n] for n in kept) / total,
        quantize_seconds=quantizer.seconds, per_channel=quantizer.per_channel, stopped=stopped)


def _status(report: GateReport) -> str:
    return f"{'passed' if report.passed else 'FAILED'} the gate ({report.summary()})"


def _ranked_groups(quantizer: Quantizer, quantized: Path, nodes: list[str],
                   probe: Callable[[], np.ndarray], log: Callable[[str], None],
                   ) -> list[tuple[list[str], float]]:
    """Groups of consecutive quantized nodes, most sensitive first: by how much the logit
    error on the probe images falls when only that group stays FP32. Ranked once: a group
    that helps only together with another (two layers that each ruin the output) still
    comes, later, before the share of FP32 work ends the search."""
    pixels = probe()
    reference = candidate_logits(OnnxSession(quantizer.source), pixels)
    baseline = logit_error(reference, candidate_logits(OnnxSession(quantized), pixels))
    size = -(-len(nodes) // MAX_GROUPS)
    groups = [nodes[i:i + size] for i in range(0, len(nodes), size)]
    log(f"int8: ranking {len(groups)} group(s) of MatMuls by sensitivity on {len(pixels)} "
        "training images")
    ranked = []
    for group in groups:
        trial = quantizer.build(group)
        error = logit_error(reference, candidate_logits(OnnxSession(trial), pixels))
        os.unlink(trial)
        ranked.append((group, round(baseline - error, 6)))
    return sorted(ranked, key=lambda item: -item[1])


def logit_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Squared error of the row-centred logits relative to their spread (softmax ignores a
    row's offset); infinite when the candidate has a NaN or an infinity."""
    if not np.isfinite(candidate).all():
        return float("inf")
    ref = reference - reference.mean(axis=1, keepdims=True)
    cand = candidate - candidate.mean(axis=1, keepdims=True)
    return float(((cand - ref) ** 2).sum() / max(float((ref ** 2).sum()), 1e-30))
