"""SmoothQuant-style smoothing: move activation outliers into the weights before INT8.

A transformer's activations carry a few channels tens of times larger than the rest (the
LayerNorm outputs and the MLP's hidden layer of a pretrained ViT); quantized per tensor,
those channels take the whole INT8 range and every other channel rounds to a handful of
levels. Weights have no such channels. SmoothQuant (Xiao et al., 2023) divides each input
channel j of a MatMul's activation X by a factor s_j and multiplies the matching weight row
by s_j, which leaves X @ W unchanged:

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)

`alpha` (0..1) sets how much of the difficulty moves to the weights (0.5 in the paper;
larger for harder activations). The maxima come from the run's training images.

Here each s_j is rounded to a power of two, so every rescaling is exact in FP32 (scaling by
2^k only shifts the exponent): the smoothed FP32 graph computes the same numbers as the
original. The division is folded into the LayerNormalization that makes X (its scale and
bias divided by s) when every reader of X is a smoothed MatMul; otherwise a constant Mul by
1/s is inserted in front of the smoothed MatMuls only (the MLP's second MatMul, reading
the GELU output). MatMuls sharing one input (query, key and value) share one s, with the
largest of their weight rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mmdeploy.errors import ConfigError
from mmdeploy.runtime.onnxruntime import OnnxSession

BATCH = 8  # images per pass when collecting maxima: bounds the intermediate tensors held
FLOOR = 1e-5  # a channel (or weight row) that is never non-zero is not rescaled by 1/0


@dataclass
class Smoothing:
    """What `smooth` did: per activation, how it was rescaled and the factors' spread."""

    alpha: float
    folded: list[str] = field(default_factory=list)  # LayerNorms whose affine took 1/s
    multiplied: list[str] = field(default_factory=list)  # activations given a Mul by 1/s
    matmuls: list[str] = field(default_factory=list)  # MatMul/Gemm nodes with scaled weights
    max_factor: float = 1.0  # the largest s_j and smallest, over every activation
    min_factor: float = 1.0

    def record(self) -> dict:
        return {"alpha": self.alpha, "matmuls": len(self.matmuls),
                "folded_into_layernorm": len(self.folded), "constant_mul": len(self.multiplied),
                "factor_range": [self.min_factor, self.max_factor]}


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha must be between 0 and 1, not {alpha:g}")


def smoothed_inputs(model: onnx.ModelProto, nodes: Iterable[str]) -> dict[str, list[str]]:
    """{activation: [MatMul/Gemm nodes among `nodes` reading it as their first input]}, for
    the nodes whose weight is a rank-2 initializer (a Gemm only with alpha = beta = 1)."""
    wanted = set(nodes)
    weights = {i.name: len(i.dims) for i in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name in wanted and weights.get(node.input[1]) == 2 and _plain(node):
            found.setdefault(node.input[0], []).append(node.name)
    return found


def _plain(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return True
    return (node.op_type == "Gemm" and not attrs.get("transA", 0)
            and attrs.get("alpha", 1.0) == 1.0)


def activation_maxima(model: onnx.ModelProto, pixels: np.ndarray | tuple[np.ndarray, ...],
                      tensors: list[str], workdir: Path) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each of `tensors` over `pixels` (or the graph's
    inputs, a tuple: a vqa graph's pixels and question tokens), in FP32 ONNX Runtime,
    `BATCH` images at a time (the graph, with those tensors as extra outputs, is written to
    `workdir` for the while)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    path = workdir / "smoothing-probe.onnx"
    onnx.save(probe, str(path))
    session = OnnxSession(path)
    maxima: dict[str, np.ndarray] = {}
    inputs = pixels if isinstance(pixels, tuple) else (pixels,)
    for start in range(0, len(inputs[0]), BATCH):
        outputs = session(*(x[start:start + BATCH] for x in inputs))
        for name in tensors:
            channel_max = np.abs(outputs[name]).reshape(-1, outputs[name].shape[-1]).max(0)
            maxima[name] = np.maximum(maxima.get(name, 0.0), channel_max)
    path.unlink()
    return maxima


def smooth(model: onnx.ModelProto, maxima: dict[str, np.ndarray],
           readers: dict[str, list[str]], alpha: float) -> tuple[onnx.ModelProto, Smoothing]:
    """A smoothed copy of `model`: for each activation in `readers` (as `smoothed_inputs`
    gives), its channels divided by power-of-two factors and its readers' weight rows
    multiplied by them."""
    check_alpha(alpha)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    done = Smoothing(alpha)
    factors_seen = []
    for activation, names in readers.items():
        readers_ = [nodes[n] for n in names]
        weight_max = np.max([_row_max(r, inits) for r in readers_], axis=0)
        factors = _factors(maxima[activation], weight_max, alpha)
        factors_seen.append(factors)
        for reader in readers_:
            _scale_weight_rows(graph, reader, inits, factors)
            done.matmuls.append(reader.name)
        source = producer.get(activation)
        sole_readers = {n.name for n in consumers.get(activation, [])} == set(names)
        if (source is not None and source.op_type == "LayerNormalization" and sole_readers
                and activation not in outputs and _fold_into_layernorm(graph, source, inits,
                                                                       factors)):
            done.folded.append(source.name)
        else:
            _insert_mul(graph, activation, readers_, factors)
            done.multiplied.append(activation)
    if factors_seen:
        every = np.concatenate(factors_seen)
        done.max_factor, done.min_factor = float(every.max()), float(every.min())
    return out, done


def _factors(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    raw = (np.maximum(activation_max, FLOOR) ** alpha
           / np.maximum(weight_max, FLOOR) ** (1 - alpha))
    return np.exp2(np.round(np.log2(raw))).astype(np.float32)


def _weight_rows_axis(node: onnx.NodeProto) -> int:
    """The weight's axis that matches the activation's channels (K)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    return 0


def _row_max(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    weight = numpy_helper.to_array(inits[node.input[1]])
    axis = _weight_rows_axis(node)
    return np.abs(weight).max(axis=1 - axis)


def _scale_weight_rows(graph: onnx.GraphProto, node: onnx.NodeProto,
                       inits: dict[str, onnx.TensorProto], factors: np.ndarray) -> None:
    """node's weight times `factors` along K, as a new initializer (a weight may be shared)."""
    weight = numpy_helper.to_array(inits[node.input[1]])
    shape = [-1, 1] if _weight_rows_axis(node) == 0 else [1, -1]
    scaled = (weight * factors.reshape(shape)).astype(weight.dtype)
    name = f"{node.input[1]}.smoothed.{node.name}"
    graph.initializer.append(numpy_helper.from_array(scaled, name))
    node.input[1] = name


def _fold_into_layernorm(graph: onnx.GraphProto, norm: onnx.NodeProto,
                         inits: dict[str, onnx.TensorProto], factors: np.ndarray) -> bool:
    """Divide LayerNorm's scale and bias by `factors`; False when they are not constants."""
    affine = [name for name in norm.input[1:3] if name]
    if not affine or any(name not in inits for name in affine):
        return False
    for index, name in enumerate(norm.input[1:3], start=1):
        if not name:
            continue
        value = numpy_helper.to_array(inits[name])
        graph.initializer.append(numpy_helper.from_array(
            (value / factors).astype(value.dtype), f"{name}.smoothed.{norm.name}"))
        norm.input[index] = f"{name}.smoothed.{norm.name}"
    return True


def _insert_mul(graph: onnx.GraphProto, activation: str, readers: list[onnx.NodeProto],
                factors: np.ndarray) -> None:
    """`activation * (1 / factors)` in front of `readers` (other readers keep `activation`)."""
    inverse, scaled = f"{activation}.smooth_inverse", f"{activation}.smoothed"
    graph.initializer.append(numpy_helper.from_array((1 / factors).astype(np.float32), inverse))
    mul = helper.make_node("Mul", [activation, inverse], [scaled], name=f"smooth/{activation}")
    for reader in readers:
        reader.input[0] = scaled
    position = min(list(graph.node).index(r) for r in readers)
    graph.node.insert(position, mul)
