"""INT8 on ONNX Runtime: quantize the verified FP32 graph, and back off where it costs answers.

Only MatMul/Gemm nodes with a constant weight are quantized: they are nearly all the work
of a ViT, and ONNX Runtime's CPU kernels run them in INT8 at about 0.3x the FP32 time
(export-notes). Two methods:

- dynamic (default): weights INT8 per tensor, activations quantized on the fly per batch;
  no calibration, and no activation range fixed in advance, so ViT activation outliers
  cost little;
- static: weights INT8 per channel and activations UINT8 (QDQ), with ranges calibrated
  once on the run's training images (`calibration.py`); ORT fuses U8 activations well.

Options on top of either method (`Int8Options`):
- `per_channel`: one weight scale per output channel (static's default; dynamic's option).
  ORT's per-channel MatMulInteger takes only [K, N] weights with the scales on N, so a
  Gemm's transposed weight (transB = 1) is stored [K, N] and a batched [1, K, N] MatMul
  weight as [K, N] first (the same products, exactly);
- `smooth_alpha`: SmoothQuant-style smoothing of the activations before quantizing
  (`smoothing.py`, exact in FP32), from per-channel maxima on the run's training images;
- `symmetric` (static): signed INT8 activations, zero points 0: the QDQ graph TensorRT's
  explicit quantization reads (ORT's CPU kernels run it at 0.8-1.0x FP32, so it is not the
  CPU default). Every result says whether its graph is TensorRT-ready (`qdq.check_symmetric`).

Kept in FP32 from the start (`fp32_from_start`): the FP16 plan's nodes (normalisation,
softmax, the router's and the kNN graph's scores, top-k and masks, `precision.fp32_nodes`)
and the cosine head (`precision.head_nodes`), where classes differ in the third decimal.
Products of two activations (attention) are never quantized.

When the accuracy gate (`gate.py`) fails, groups of quantized MatMuls move back to FP32 one
at a time, re-gated after each, until the gate passes, or until more than `MAX_FP32_SHARE`
of the MatMul work would be FP32 (INT8 no longer pays): then the result fails, with every
step in its report. The order (`fallback_order`): "structural" (default) first tries the
adapter's own matmuls, the tower's first block and its last block (`structure.py`: where
INT8 error is known to hurt most, for a small share of the work), then the rest as
"measured" does; "measured" ranks groups of consecutive nodes (at most `MAX_GROUPS`, a
block or so each) by how much the logit error on training images falls when only that
group stays FP32, most sensitive first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from mmdeploy.errors import ConfigError
from mmdeploy.runtime.onnxruntime import OnnxSession, onnxruntime_required

from .calibration import PixelReader
from .gate import GateReport, candidate_logits
from .precision import fp32_nodes, head_nodes
from .smoothing import Smoothing, activation_maxima, check_alpha, smooth, smoothed_inputs
from .structure import structure

with onnxruntime_required():
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

METHODS = ("dynamic", "static")
FALLBACK_ORDERS = ("structural", "measured")
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


Inputs = np.ndarray | tuple[np.ndarray, ...]  # a graph's inputs: pixels, or a vqa graph's three


@dataclass(frozen=True)
class Int8Options:
    """How the graph is quantized, beyond the method (see the module docstring)."""

    per_channel: bool | None = None  # None: the method's default (static yes, dynamic no)
    smooth_alpha: float | None = None  # None: no smoothing
    symmetric: bool = False  # static only: S8 activations, zero points 0 (TensorRT-ready)
    fallback_order: str = "structural"

    def check(self, method: str) -> None:
        if self.smooth_alpha is not None:
            check_alpha(self.smooth_alpha)
        if self.symmetric and method != "static":
            raise ConfigError("symmetric INT8 (TensorRT's QDQ graph) is static only; use "
                              "--int8 static")
        if self.fallback_order not in FALLBACK_ORDERS:
            raise ConfigError(f"unknown fallback order {self.fallback_order!r}; choose from "
                              f"{', '.join(FALLBACK_ORDERS)}")


@dataclass
class Quantizer:
    """Writes INT8 versions of one FP32 graph with a given set of nodes left FP32.

    The graph is prepared once (Gemm weights untransposed for dynamic per-channel scales,
    smoothing), exactly in FP32, into `workdir`; `source` is then that graph. Static
    calibration runs once, on the first build; later builds (the fallback's) reuse its
    ranges from a cache file in `workdir`. It runs one batch at a time (ORT's
    `CalibStridedMinMax`, which works for every method): holding every intermediate output
    of 64 ViT-B images would take gigabytes, and histogram methods cannot stack batches of
    different sizes. ORT's `CalibMaxIntermediateOutputs` is left unset: in onnxruntime 1.32
    it drops the collected data. Smoothing measures its maxima on `calibration`'s images
    (the run's training split), for either method.
    """

    source: Path
    method: str
    workdir: Path
    calibration: PixelReader | None = None
    calibrate_method: str = "minmax"
    options: Int8Options = field(default_factory=Int8Options)
    adapter_weights: Path | None = None  # the run's adapter file: the fallback's first group
    seconds: float = 0.0
    builds: int = 0
    excluded_from_start: list[str] = field(init=False)
    work: dict[str, int] = field(init=False)  # quantizable node -> multiply-adds per image
    smoothing: Smoothing | None = field(init=False, default=None)
    _gemms: set[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown INT8 method {self.method!r}; choose from "
                              f"{', '.join(METHODS)}")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ConfigError(f"unknown calibration method {self.calibrate_method!r}; choose "
                              f"from {', '.join(CALIBRATION_METHODS)}")
        self.options.check(self.method)
        if self.method == "static" and self.calibration is None:
            raise ConfigError("static INT8 needs calibration images; use --int8 dynamic")
        if self.options.smooth_alpha is not None and self.calibration is None:
            raise ConfigError("smoothing needs training images to measure activations on")
        self.source = _linked_into(self.source, self.workdir)
        model = onnx.load(str(self.source))
        self.excluded_from_start = fp32_from_start(model)
        self.work = quantizable(model, self.excluded_from_start)
        self._gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
        if not self.work:
            raise ConfigError(f"{self.source.name}: no MatMul/Gemm with a constant weight to "
                              "quantize")
        self._structure = structure(model, list(self.work), self.adapter_weights)
        self._prepare(model)

    def _prepare(self, model: onnx.ModelProto) -> None:
        """Write the graph to quantize, when it differs from the FP32 one (exact in FP32)."""
        changed = False
        if self.per_channel and self.method == "dynamic":
            changed |= untranspose_gemm_weights(model, set(self.work)) > 0
            changed |= squeeze_batched_weights(model, set(self.work)) > 0
        if self.options.smooth_alpha is not None:
            started = time.perf_counter()
            readers = smoothed_inputs(model, self.work)
            maxima = activation_maxima(model, self.calibration.inputs, list(readers),
                                       self.workdir)
            model, self.smoothing = smooth(model, maxima, readers, self.options.smooth_alpha)
            self.seconds += time.perf_counter() - started
            changed = True
        if changed:
            drop_unused_initializers(model)
            self.source = self.workdir / "prepared.onnx"
            onnx.save(model, str(self.source))

    @property
    def calibration_record(self) -> dict | None:
        """How the static ranges (or the smoothing maxima) were calibrated, for the
        manifest; None when no image was used."""
        reader = self.calibration
        if reader is None or (self.method != "static" and self.smoothing is None):
            return None
        return {"images": len(reader.pixels),
                "method": self.calibrate_method if self.method == "static" else None,
                "seed": reader.seed, "split": reader.split}

    @property
    def per_channel(self) -> bool:
        chosen = self.options.per_channel
        return self.method == "static" if chosen is None else chosen

    def first_groups(self) -> list[tuple[str, list[str]]]:
        """The fallback's first groups (reason, nodes), when its order is structural."""
        if self.options.fallback_order != "structural":
            return []
        return self._structure.first_groups()

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
                                 per_channel=self.per_channel)
            else:
                self.calibration.rewind()
                symmetric = self.options.symmetric
                quantize_static(
                    self.source, target, self.calibration, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(ORT_INT8_OPS), per_channel=self.per_channel,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    calibrate_method=CALIBRATION_METHODS[self.calibrate_method],
                    calibration_cache_path=self.workdir / "calibration.json",
                    extra_options={"MatMulConstBOnly": True, "CalibStridedMinMax": 1,
                                   "ActivationSymmetric": symmetric,
                                   "WeightSymmetric": True,
                                   # TensorRT reads INT8 Q/DQ only: no INT32 bias
                                   "QuantizeBias": not symmetric})
        self.seconds += time.perf_counter() - started
        return target


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove the initializers no node reads (weights replaced by prepared copies)."""
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def squeeze_batched_weights(model: onnx.ModelProto, nodes: set[str]) -> int:
    """Store each batched [1, ..., K, N] MatMul weight of `nodes` as [K, N] when its
    activation has at least as many axes (broadcasting makes it the same product); returns
    how many. ORT's per-channel MatMulInteger takes [K, N] weights only."""
    inits = {i.name: i for i in model.graph.initializer}
    shapes = _shapes(model)
    count = 0
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if (node.name not in nodes or weight is None or len(weight.dims) <= 2
                or any(d != 1 for d in weight.dims[:-2])
                or len(shapes.get(node.input[0], [])) < len(weight.dims)):
            continue
        name = f"{node.input[1]}.squeezed.{node.name}"
        value = numpy_helper.to_array(weight)
        model.graph.initializer.append(numpy_helper.from_array(
            value.reshape(value.shape[-2:]), name))
        node.input[1] = name
        count += 1
    return count


def untranspose_gemm_weights(model: onnx.ModelProto, nodes: set[str]) -> int:
    """Store the weight of each Gemm in `nodes` with transB = 1 as [K, N] and clear transB
    (the same product, exactly); returns how many. ORT's dynamic quantizer puts per-channel
    scales on the weight's last axis, which for a transposed weight is K, not the output
    channels."""
    inits = {i.name: i for i in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        trans_b = next((a for a in node.attribute if a.name == "transB"), None)
        if (node.op_type != "Gemm" or node.name not in nodes or trans_b is None
                or not trans_b.i or node.input[1] not in inits):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        name = f"{node.input[1]}.untransposed.{node.name}"
        model.graph.initializer.append(numpy_helper.from_array(
            np.ascontiguousarray(weight.T), name))
        node.input[1] = name
        trans_b.i = 0
        count += 1
    return count


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
    options: dict = field(default_factory=dict)  # Int8Options, as recorded
    smoothing: dict | None = None  # Smoothing.record(), when the graph was smoothed
    tensorrt_problems: list[str] = field(default_factory=list)  # qdq.check_symmetric's

    @property
    def tensorrt_ready(self) -> bool:
        """A symmetric INT8 Q/DQ graph, as TensorRT's explicit quantization reads."""
        return not self.tensorrt_problems

    def details(self) -> dict[str, Any]:
        """How the graph was made: what its INT8 export record keeps beside its gate report."""
        problems = self.tensorrt_problems
        return {"method": self.method, "calibration": self.calibration,
                "per_channel": self.per_channel, "options": self.options,
                "smoothing": self.smoothing, "tensorrt_ready": self.tensorrt_ready,
                "tensorrt_refusal": f"{problems[0]} (and {len(problems) - 1} more)"
                if problems else None,
                "kept_fp32": self.kept_fp32,
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


@dataclass
class _Candidate:
    """The fallback's current graph file and the nodes it keeps FP32."""

    path: Path
    kept: list[str] = field(default_factory=list)


def quantize_gated(quantizer: Quantizer, gate: Callable[[Path], GateReport],
                   probe: Callable[[], Inputs], log: Callable[[str], None] = print,
                   ) -> Int8Result:
    """Quantize, gate, and on failure move MatMul groups back to FP32 (see the module
    docstring for the order) until the gate passes or INT8 would stop paying.

    `gate` measures a candidate graph file; `probe` gives the images (training split) the
    sensitivity is measured on, only asked for when a ranking is needed.
    """
    work = quantizer.work
    total = sum(work.values())
    now = _Candidate(quantizer.build([]))
    report = gate(now.path)
    log(f"int8 {quantizer.method}, {len(work)} MatMul(s) quantized: {_status(report)}")
    steps: list[dict] = []
    stopped = None
    if not report.passed:
        stopped = "no MatMul group was left to move back to FP32"
        for reason, group, sensitivity in _fallback_groups(quantizer, now, probe, log):
            share = sum(work[n] for n in [*now.kept, *group]) / total
            if share > MAX_FP32_SHARE:
                stopped = (f"the next group would put {share:.1%} of the MatMul work in FP32 "
                           f"(INT8 stops paying beyond {MAX_FP32_SHARE:.0%})")
                break
            now.kept += group
            os.unlink(now.path)
            now.path = quantizer.build(now.kept)
            report = gate(now.path)
            steps.append({"kept_fp32": group, "why": reason, "sensitivity": sensitivity,
                          "fp32_share": round(share, 4), "gate": report.to_dict()})
            log(f"int8: {reason}: {group[0]}..{group[-1]} ({len(group)}) back to FP32, "
                f"{share:.0%} of the MatMul work FP32: {_status(report)}")
            if report.passed:
                stopped = None
                break
    if stopped:
        log(f"int8: stopping: {stopped}")
    return Int8Result(
        path=now.path, method=quantizer.method, calibration=quantizer.calibration_record,
        kept_fp32=now.kept,
        excluded_from_start=quantizer.excluded_from_start, report=report,
        fallback_steps=steps, int8_share=1 - sum(work[n] for n in now.kept) / total,
        quantize_seconds=quantizer.seconds, per_channel=quantizer.per_channel, stopped=stopped,
        options=asdict(quantizer.options),
        smoothing=quantizer.smoothing.record() if quantizer.smoothing else None,
        tensorrt_problems=tensorrt_problems(now.path))


def tensorrt_problems(path: Path) -> list[str]:
    """Why TensorRT's parser would refuse the graph at `path` (empty: TensorRT-ready)."""
    from .qdq import check_symmetric  # qdq imports this module's quantizer helpers

    return check_symmetric(onnx.load(str(path), load_external_data=False))


def _fallback_groups(quantizer: Quantizer, now: _Candidate, probe: Callable[[], Inputs],
                     log: Callable[[str], None],
                     ) -> Iterator[tuple[str, list[str], float | None]]:
    """(why, group, sensitivity) in the order the fallback tries them: the structural
    groups first (no sensitivity measured), then the other nodes' groups, most sensitive
    first, ranked (only if it comes to that) against the fallback's graph as it then is."""
    first = quantizer.first_groups()
    for reason, group in first:
        yield reason, group, None
    done = {n for _, group in first for n in group}
    rest = [n for n in quantizer.work if n not in done]
    if rest:
        for group, sensitivity in _ranked_groups(quantizer, now.path, list(now.kept), rest,
                                                 probe, log):
            yield "measured", group, sensitivity


def _status(report: GateReport) -> str:
    return f"{'passed' if report.passed else 'FAILED'} the gate ({report.summary()})"


def _ranked_groups(quantizer: Quantizer, quantized: Path, kept: list[str], nodes: list[str],
                   probe: Callable[[], Inputs], log: Callable[[str], None],
                   ) -> list[tuple[list[str], float]]:
    """Groups of consecutive `nodes`, most sensitive first: by how much the logit error on
    the probe images falls when that group too stays FP32 (beside `kept`). Ranked once: a group
    that helps only together with another (two layers that each ruin the output) still
    comes, later, before the share of FP32 work ends the search."""
    pixels = probe()  # the graph's inputs: pixels, or a tuple with a vqa graph's questions
    reference = candidate_logits(OnnxSession(quantizer.source), pixels)
    baseline = logit_error(reference, candidate_logits(OnnxSession(quantized), pixels))
    size = -(-len(nodes) // MAX_GROUPS)
    groups = [nodes[i:i + size] for i in range(0, len(nodes), size)]
    log(f"int8: ranking {len(groups)} group(s) of MatMuls by sensitivity on {len(reference)} "
        "training images")
    ranked = []
    for group in groups:
        trial = quantizer.build([*kept, *group])
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
