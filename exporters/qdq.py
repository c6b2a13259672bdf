"""The QDQ graph TensorRT's explicit quantization reads: INT8 with FP16 fallback (DESIGN 9).

TensorRT quantizes only symmetrically: signed INT8 activations and weights with a zero point
of 0, and its ONNX parser refuses a graph with anything else (a UINT8 or non-zero zero point,
or ONNX Runtime's integer operators such as MatMulInteger and QLinearMatMul). So this graph
is written with those settings whatever the CPU INT8 graph (`model.int8.onnx`) uses, and
`check_symmetric` verifies it before TensorRT sees it.

How it is quantized (ONNX Runtime's `quantize_static`, QDQ format), following NVIDIA's own
TensorRT recipe (TensorRT Model Optimizer's ONNX INT8 path):
- only the nodes `precision.int8_plan` puts in INT8 (MatMul/Gemm/Conv with a constant
  weight, outside routers, kNN masks and the cosine head);
- activations per tensor, symmetric (calibrated max |x| over the reader's images);
- weights per output channel, symmetric (Conv axis 0, MatMul [K, N] axis 1, Gemm by transB;
  a batched [1, K, N] MatMul weight per tensor), kept FP32 behind a Q/DQ pair so TensorRT
  quantizes them itself at build time;
- biases stay FP32 and no output is quantized: TensorRT fuses each DQ pair into the matmul
  or convolution it feeds, whose output stays in float (FP16 in the engine).
ONNX Runtime routes every consumer of a quantized activation through its Q/DQ pair; the
consumers that are not INT8 (a router reading the same pooled features as an expert) get
the float tensor back here, so the plan's FP32 decisions see unrounded inputs.

ONNX Runtime's MinMax calibration keeps every calibration batch's intermediate tensors
until the end (about 0.1 GB an image at ViT-B/16 size, from its tensor shapes): calibrate
on tens of images, not thousands.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mmdeploy.artifacts import sha256_file
from mmdeploy.errors import ArtifactError, ConfigError
from mmdeploy.runtime.onnxruntime import onnxruntime_required

from .int8 import quiet_quantizer
from .precision import TENSORRT_INT8_OPS, int8_plan

QDQ_FILE = "model.qdq.onnx"
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# ONNX Runtime's integer (QOperator and dynamic) operators: TensorRT's parser has none.
REFUSED_OPS = frozenset({
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QGemm", "QAttention", "QLinearMatMul", "QLinearConv",
})


def check_symmetric(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT's parser would refuse `model`'s quantization, one line per problem, in
    graph order (empty when it is a symmetric INT8 QDQ graph)."""
    constants = _constants(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    problems = []
    for node in model.graph.node:
        label = f"node {node.name or node.output[0]!r} ({node.op_type})"
        if node.op_type in REFUSED_OPS or node.op_type.startswith("QLinear"):
            problems.append(f"{label}: ONNX Runtime's integer operator, not Q/DQ")
        elif node.op_type in _QDQ_OPS and node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: in domain {node.domain!r}, not ONNX's")
        elif node.op_type in _QDQ_OPS:
            problems += [f"{label}: {p}" for p in _qdq_problems(node, constants, producer)]
    return problems


def _qdq_problems(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto],
                  producer: dict[str, onnx.NodeProto]) -> list[str]:
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero_point is not None and zero_point not in constants:
        return ["its zero point is computed, not a constant"]
    kind = _quantized_type(node, zero_point, constants, producer)
    problems = []
    if kind != onnx.TensorProto.INT8:
        name = onnx.TensorProto.DataType.Name(kind) if kind is not None else "unknown"
        problems.append(f"quantizes to {name}, not INT8")
    if zero_point is not None:
        values = numpy_helper.to_array(constants[zero_point])
        if np.any(values != 0):
            problems.append(f"zero point {np.unique(values)[:4].tolist()} is not 0 "
                            "(asymmetric)")
    return problems


def _quantized_type(node, zero_point, constants, producer) -> int | None:
    """The integer type a Q produces or a DQ reads: the zero point's when there is one,
    else QuantizeLinear's `output_dtype` (UINT8 by default) or a DQ's input's."""
    if zero_point is not None:
        return constants[zero_point].data_type
    if node.op_type == "QuantizeLinear":
        dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
        return dtype or onnx.TensorProto.UINT8
    source = node.input[0]
    if source in constants:
        return constants[source].data_type
    upstream = producer.get(source)
    if upstream is not None and upstream.op_type == "QuantizeLinear":
        upstream_zero = upstream.input[2] if len(upstream.input) > 2 else ""
        return _quantized_type(upstream, upstream_zero or None, constants, producer)
    return None


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant nodes' tensors by name (only zero points are ever read)."""
    tensors = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def refuse_unless_symmetric(path: Path) -> None:
    """Raise ArtifactError naming the first problem, before TensorRT's parser sees `path`."""
    problems = check_symmetric(onnx.load(str(path), load_external_data=False))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(f"{path}: not a TensorRT INT8 graph (symmetric INT8 Q/DQ only): "
                            f"{problems[0]}{more}")


def write_tensorrt_qdq(fp32_onnx: Path, out: Path, reader,
                       nodes_to_exclude: Iterable[str] = ()) -> dict:
    """Quantize `fp32_onnx` into the symmetric INT8 QDQ graph `out` for TensorRT.

    `reader` is any `onnxruntime.quantization.CalibrationDataReader` feeding `pixel_values`
    (fresh or rewound: it is read to the end once). `nodes_to_exclude` are kept in float on
    top of the plan's own exclusions. Returns the facts for the manifest: file, files (with
    the external data file when the FP32 graph has one), sha256, quantized nodes and those
    left in float with the reason, seconds.
    """
    with onnxruntime_required():
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(fp32_onnx), load_external_data=False)
    plan = int8_plan(graph)
    excluded = set(nodes_to_exclude)
    quantized = [name for name in plan.int8 if name not in excluded]
    if not quantized:  # ONNX Runtime would read an empty list as "quantize everything"
        raise ConfigError(f"{fp32_onnx.name}: no MatMul/Gemm/Conv with a constant weight left "
                          "to quantize")
    not_quantized = {**plan.not_quantized, **{n: "excluded" for n in excluded if n in plan.int8}}
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.graph.initializer)
    rank = {i.name: len(i.dims) for i in graph.graph.initializer}
    # A batched MatMul weight ([1, K, N]) has no single output-channel axis: per tensor.
    per_tensor = {node.input[1]: [{"symmetric": True}] for node in graph.graph.node
                  if node.name in quantized and node.op_type == "MatMul"
                  and rank.get(node.input[1], 2) != 2}
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp, \
            quiet_quantizer():
        written = Path(tmp) / out.name
        quantize_static(
            str(fp32_onnx), str(written), reader, quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=list(TENSORRT_INT8_OPS), nodes_to_quantize=quantized,
            use_external_data_format=external,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "MatMul": 1},
                "AddQDQPairToWeight": True, "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": list(TENSORRT_INT8_OPS),
                "TensorQuantOverrides": per_tensor,
            })
        model = onnx.load(str(written), load_external_data=False)
        _float_inputs_outside_int8(model, set(quantized))
        onnx.save(model, str(written))
        if problems := check_symmetric(model):  # ONNX Runtime changed its defaults?
            raise ArtifactError(f"{written.name}: quantization left {problems[0]}")
        files = sorted(path.name for path in Path(tmp).iterdir())  # (+ <name>.data)
        for name in files:
            os.replace(Path(tmp) / name, out.parent / name)
    return {
        "file": out.name, "files": files, "sha256": sha256_file(out),
        "quantized_nodes": quantized,
        "not_quantized": not_quantized, "fp32_nodes": len(plan.fp32),
        "scheme": "int8 symmetric; activations per tensor, weights per output channel",
        "quantize_seconds": round(time.perf_counter() - started, 3),
    }


def _float_inputs_outside_int8(model: onnx.ModelProto, quantized: set[str]) -> None:
    """Give every node outside `quantized` (and the Q/DQ nodes) the float tensor a Q/DQ pair
    was made from, instead of its fake-quantized copy."""
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    constants = {i.name for i in model.graph.initializer}
    original = {}
    for node in nodes:
        if node.op_type != "DequantizeLinear":
            continue
        quantize = producer.get(node.input[0])
        if quantize is not None and quantize.op_type == "QuantizeLinear" \
                and quantize.input[0] not in constants:
            original[node.output[0]] = quantize.input[0]
    for node in nodes:
        if node.name in quantized or node.op_type in _QDQ_OPS:
            continue
        for index, name in enumerate(node.input):
            if name in original:
                node.input[index] = original[name]

